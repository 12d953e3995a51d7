"""The model registry (MLflow's, with aliases): versions with their lineage, promotion through
gates, rollback; every change audited and published as an event."""
