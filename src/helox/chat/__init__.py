"""Chat: conversations with tool calls (messages.py), chat templates rendered as transformers
renders them (templates.py), a conversation as token ids with the tokens the loss is taken on
(masks.py), preference pairs for DPO (preferences.py), and a synthetic tool-use set with the
scoring of generated tool calls (tooluse.py). Fine-tuning builds on it."""
