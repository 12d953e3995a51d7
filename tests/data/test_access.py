"""Dataset access control and the hash-chained audit log: who may do what, and tamper detection."""

import hashlib
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from helox.data import access
from helox.data.access import (GENESIS_HASH, AccessDenied, AuditLog, authorize_read,
                               authorize_write, grant, list_acl, resolve_principal, revoke,
                               transfer_owner)
from helox.errors import HeloxError

DS = "quickstart"


def _last(gov: Path) -> dict:
    return list(AuditLog(gov).entries())[-1]


def _attempt(fn, *args) -> bool:
    try:
        fn(*args)
    except AccessDenied:
        return False
    return True


@pytest.fixture
def gov(tmp_path) -> Path:
    """alice owns DS; bob may read it, carol may write it, dave has nothing."""
    gov = tmp_path / "governance"
    authorize_write(gov, DS, "v1", "alice")
    grant(gov, DS, "bob", ["read"], by="alice")
    grant(gov, DS, "carol", ["write"], by="alice")
    return gov


# --- principals ------------------------------------------------------------------------------


def test_resolve_principal_precedence(monkeypatch):
    monkeypatch.setattr(access.getpass, "getuser", lambda: "osuser")
    monkeypatch.setenv("HELOX_PRINCIPAL", "envuser")
    assert resolve_principal("cfguser") == "cfguser"
    assert resolve_principal(None) == "envuser"
    monkeypatch.setenv("HELOX_PRINCIPAL", "")  # empty counts as unset
    assert resolve_principal(None) == "osuser"
    monkeypatch.delenv("HELOX_PRINCIPAL")
    assert resolve_principal(None) == "osuser"
    assert resolve_principal("alice@lab.example") == "alice@lab.example"


@pytest.mark.parametrize("bad", ["", "has space", "*", "a/b", "ünï"])
def test_resolve_principal_rejects_bad_names(monkeypatch, bad):
    with pytest.raises(HeloxError, match="not a valid principal"):
        resolve_principal(bad)
    monkeypatch.setenv("HELOX_PRINCIPAL", bad or "x y")
    with pytest.raises(HeloxError, match="HELOX_PRINCIPAL"):
        resolve_principal(None)


def test_resolve_principal_without_any_login(monkeypatch):
    def no_user():
        raise OSError("No username set in the environment")
    monkeypatch.delenv("HELOX_PRINCIPAL", raising=False)
    monkeypatch.setattr(access.getpass, "getuser", no_user)
    with pytest.raises(HeloxError) as e:
        resolve_principal(None)
    assert "HELOX_PRINCIPAL" in e.value.hint


# --- permissions -----------------------------------------------------------------------------


def test_first_writer_becomes_owner(gov):
    acl = list_acl(gov)[DS]
    assert acl.owner == "alice"
    assert acl.grants == {"bob": ["read"], "carol": ["write"]}
    first = list(AuditLog(gov).entries())[0]
    assert (first["action"], first["principal"], first["details"]) == \
        ("write", "alice", {"new_owner": True})


@pytest.mark.parametrize("principal,can_read,can_write", [
    ("alice", True, True),    # owner: implicit read and write
    ("bob", True, False),     # granted read
    ("carol", False, True),   # granted write: does not imply read
    ("dave", False, False),   # stranger
])
def test_permission_matrix_and_log(gov, principal, can_read, can_write):
    assert _attempt(authorize_read, gov, DS, "v1", principal) is can_read
    entry = _last(gov)
    assert entry["principal"] == principal and entry["dataset"] == DS
    assert entry["action"] == ("read" if can_read else "deny")
    assert entry["details"]["purpose"] == "train"
    if not can_read:
        assert entry["details"]["attempted"] == "read" and entry["details"]["owner"] == "alice"

    assert _attempt(authorize_write, gov, DS, "v2", principal) is can_write
    entry = _last(gov)
    assert entry["principal"] == principal and entry["version"] == "v2"
    assert entry["action"] == ("write" if can_write else "deny")
    assert list_acl(gov)[DS].owner == "alice"  # a later write never changes the owner


def test_denied_read_names_everything_and_is_logged_first(gov):
    before = len(list(AuditLog(gov).entries()))
    with pytest.raises(AccessDenied) as e:
        authorize_read(gov, DS, "v1", "dave", purpose="train")
    err = e.value
    for word in ("dave", DS, "alice", "read"):
        assert word in err.message
    assert "alice" in err.hint and f"helox data grant {DS} dave --read" in err.hint
    assert (err.principal, err.dataset, err.missing, err.owner) == ("dave", DS, "read", "alice")
    entries = list(AuditLog(gov).entries())
    assert len(entries) == before + 1
    deny = entries[-1]
    assert (deny["action"], deny["principal"], deny["version"]) == ("deny", "dave", "v1")
    assert deny["details"] == {"purpose": "train", "attempted": "read", "missing": "read",
                               "owner": "alice"}


def test_denied_write_hint_asks_for_write(gov):
    with pytest.raises(AccessDenied) as e:
        authorize_write(gov, DS, "v2", "bob")
    assert f"helox data grant {DS} bob --write" in e.value.hint
    assert e.value.missing == "write"


def test_reading_a_name_nobody_wrote_is_denied_and_logged(tmp_path):
    gov = tmp_path / "governance"
    with pytest.raises(AccessDenied, match="no owner"):
        authorize_read(gov, "never-written", "v1", "alice")
    assert _last(gov)["action"] == "deny" and _last(gov)["dataset"] == "never-written"


def test_revoke_takes_effect(gov):
    acl = revoke(gov, DS, "bob", ["read"], by="alice")
    assert "bob" not in acl.grants
    assert not _attempt(authorize_read, gov, DS, "v1", "bob")
    entries = list(AuditLog(gov).entries())
    assert entries[-2]["action"] == "revoke" and entries[-2]["principal"] == "alice"
    assert entries[-2]["details"] == {"target": "bob", "permissions": ["read"]}
    assert entries[-1]["action"] == "deny"


def test_grant_merges_and_revoke_removes_one_permission(gov):
    assert grant(gov, DS, "bob", ["write", "read"], by="alice").grants["bob"] == ["read", "write"]
    assert revoke(gov, DS, "bob", ["write"], by="alice").grants["bob"] == ["read"]
    assert _attempt(authorize_read, gov, DS, "v1", "bob")
    assert not _attempt(authorize_write, gov, DS, "v2", "bob")


def test_non_owner_cannot_grant_revoke_or_transfer(gov):
    before = list_acl(gov)
    for call in (lambda: grant(gov, DS, "dave", ["read"], by="bob"),
                 lambda: revoke(gov, DS, "carol", ["write"], by="carol"),
                 lambda: transfer_owner(gov, DS, "dave", by="dave")):
        with pytest.raises(AccessDenied) as e:
            call()
        assert e.value.missing == "owner" and "alice" in e.value.message
    assert list_acl(gov) == before
    denies = [e for e in AuditLog(gov).entries() if e["action"] == "deny"]
    assert [(d["principal"], d["details"]["attempted"]) for d in denies] == \
        [("bob", "grant"), ("carol", "revoke"), ("dave", "transfer")]
    with pytest.raises(AccessDenied) as e:
        grant(gov, DS, "dave", ["read"], by="bob")
    assert f"helox data grant {DS} dave --read" in e.value.hint


def test_everyone_may_be_granted_read_but_not_write(gov):
    entries_before = len(list(AuditLog(gov).entries()))
    with pytest.raises(HeloxError, match="everyone"):
        grant(gov, DS, "*", ["read", "write"], by="alice")
    assert len(list(AuditLog(gov).entries())) == entries_before  # refused input is no change
    grant(gov, DS, "*", ["read"], by="alice")
    assert _attempt(authorize_read, gov, DS, "v1", "dave")
    assert not _attempt(authorize_write, gov, DS, "v2", "dave")


def test_transfer_hands_over_ownership(gov):
    acl = transfer_owner(gov, DS, "bob", by="alice")
    assert acl.owner == "bob" and "bob" not in acl.grants
    assert not _attempt(authorize_write, gov, DS, "v2", "alice")
    grant(gov, DS, "alice", ["read"], by="bob")
    assert _attempt(authorize_read, gov, DS, "v1", "alice")


def test_pointless_changes_are_refused(gov):
    with pytest.raises(HeloxError, match="already owns"):
        grant(gov, DS, "alice", ["read"], by="alice")
    with pytest.raises(HeloxError, match="holds no write"):
        revoke(gov, DS, "bob", ["write"], by="alice")
    with pytest.raises(HeloxError, match="not valid"):
        grant(gov, DS, "bob", ["delete"], by="alice")
    with pytest.raises(HeloxError, match="no dataset named"):
        grant(gov, DS + "-other", "bob", ["read"], by="alice")


def test_entries_filter_by_dataset_and_principal(gov):
    authorize_write(gov, "other", "w1", "dave")
    authorize_read(gov, DS, "v1", "bob")
    assert {e["dataset"] for e in AuditLog(gov).entries(dataset="other")} == {"other"}
    bob = list(AuditLog(gov).entries(principal="bob"))
    # bob's own read, and the grant that names him as its target
    assert [(e["action"], e["principal"]) for e in bob] == [("grant", "alice"), ("read", "bob")]


# --- the audit log: chain, anchor and tampering ----------------------------------------------


def _log_with_entries(gov: Path, count: int = 6) -> AuditLog:
    log = AuditLog(gov)
    for i in range(count):
        log.append(f"user{i}", "read", DS, f"v{i}", {"purpose": "train"})
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines(keepends=True)


def _rewrite(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(lines))


def test_untouched_log_verifies_and_chain_is_independently_valid(tmp_path):
    log = _log_with_entries(tmp_path)
    report = log.verify()
    assert report.ok and report.num_entries == 6, str(report)
    # Recompute the chain here from the spec, without the module's hashing helpers.
    prev = "0" * 64
    for seq, line in enumerate(_lines(log), start=1):
        entry = json.loads(line)
        body = {k: v for k, v in entry.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert entry["seq"] == seq and entry["prev_hash"] == prev
        assert entry["hash"] == hashlib.sha256(canonical).hexdigest()
        assert entry["time"].endswith("+00:00")
        prev = entry["hash"]
    assert json.loads(log.head_path.read_text()) == {"seq": 6, "hash": prev}
    assert GENESIS_HASH == "0" * 64


def test_edited_middle_entry_is_named(tmp_path):
    log = _log_with_entries(tmp_path)
    lines = _lines(log)
    lines[2] = lines[2].replace('"user2"', '"mallory"')
    _rewrite(log, lines)
    report = log.verify()
    assert [p.line for p in report.problems] == [3]
    assert "edited" in report.problems[0].message


def test_edited_and_rehashed_entry_is_caught_by_the_next_link(tmp_path):
    log = _log_with_entries(tmp_path)
    lines = _lines(log)
    entry = json.loads(lines[2])
    entry["principal"] = "mallory"
    entry["hash"] = access.entry_hash(entry)
    lines[2] = json.dumps(entry) + "\n"
    _rewrite(log, lines)
    report = log.verify()
    assert [p.line for p in report.problems] == [4]
    assert "prev_hash" in report.problems[0].message


def test_deleted_middle_entry_is_named(tmp_path):
    log = _log_with_entries(tmp_path)
    lines = _lines(log)
    del lines[2]
    _rewrite(log, lines)
    report = log.verify()
    assert [p.line for p in report.problems] == [3]
    assert "seq 3 is missing" in report.problems[0].message


def test_deleted_last_entry_is_caught_by_the_anchor(tmp_path):
    log = _log_with_entries(tmp_path)
    _rewrite(log, _lines(log)[:-2])
    report = log.verify()
    assert len(report.problems) == 1 and report.problems[0].line is None
    assert "tail truncation" in report.problems[0].message
    assert "last 2 entries" in report.problems[0].message


def test_deleted_log_is_caught_by_the_anchor(tmp_path):
    log = _log_with_entries(tmp_path)
    log.path.unlink()
    assert "tail truncation" in str(log.verify())


def test_rewritten_last_entry_is_caught_by_the_anchor(tmp_path):
    log = _log_with_entries(tmp_path)
    lines = _lines(log)
    entry = json.loads(lines[-1])
    entry["version"] = "forged"
    entry["hash"] = access.entry_hash(entry)
    lines[-1] = json.dumps(entry) + "\n"
    _rewrite(log, lines)
    assert "rewritten" in str(log.verify())


def test_swapped_entries_are_detected(tmp_path):
    log = _log_with_entries(tmp_path)
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(log, lines)
    report = log.verify()
    assert {p.line for p in report.problems} == {3, 4}
    assert any("reordered" in p.message for p in report.problems if p.line == 4)


def test_malformed_line_is_named(tmp_path):
    log = _log_with_entries(tmp_path)
    lines = _lines(log)
    lines[1] = "{not json\n"
    lines[4] = json.dumps({"seq": 5}) + "\n"
    _rewrite(log, lines)
    report = log.verify()
    malformed = [p.line for p in report.problems if "malformed" in p.message]
    assert malformed == [2, 5]


def test_append_after_a_torn_write_keeps_the_chain(tmp_path):
    log = _log_with_entries(tmp_path, 3)
    with open(log.path, "a") as f:
        f.write('{"seq": 4, "ti')  # a crash in the middle of a write
    entry = log.append("alice", "read", DS, "v9")
    assert entry["seq"] == 4 and entry["prev_hash"] == json.loads(_lines(log)[2])["hash"]
    report = log.verify()
    assert [(p.line, "malformed" in p.message) for p in report.problems] == [(4, True)]
    assert report.num_entries == 4


def test_tail_is_found_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(access, "TAIL_BLOCK_BYTES", 37)  # far shorter than one entry
    log = _log_with_entries(tmp_path, 12)
    assert log.verify().ok
    assert json.loads(_lines(log)[-1])["seq"] == 12


def test_acl_edited_by_hand_is_detected(gov):
    assert AuditLog(gov).verify().ok
    path = gov / "acl.json"
    data = json.loads(path.read_text())
    data["datasets"][DS]["grants"]["dave"] = ["read", "write"]
    path.write_text(json.dumps(data))
    report = AuditLog(gov).verify()
    assert len(report.problems) == 1 and "acl.json" in report.problems[0].message
    assert "dave" in report.problems[0].message


def test_malformed_acl_is_a_clear_error(gov):
    (gov / "acl.json").write_text("{")
    with pytest.raises(HeloxError, match="acl.json"):
        authorize_read(gov, DS, "v1", "bob")


# --- concurrency -----------------------------------------------------------------------------


def _append_many(gov: str, principal: str, count: int, go) -> None:
    go.wait(30)
    log = AuditLog(Path(gov))
    for i in range(count):
        log.append(principal, "read", DS, f"v{i}")


def test_two_processes_keep_one_chain(tmp_path, monkeypatch):
    # Spawned children unpickle `_append_many` by importing this module as tests.data.test_access.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), f"p{i}", 100, go))
             for i in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    log = AuditLog(tmp_path)
    report = log.verify()
    assert report.ok and report.num_entries == 200, str(report)
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == list(range(1, 201))
    assert sum(e["principal"] == "p0" for e in entries) == 100
