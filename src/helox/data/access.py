"""Who may read and write each dataset, and a tamper-evident audit log of every access.

Access is per dataset NAME: every version of a name shares one owner and one set of grants.
The files live in `<workspace>/governance/`:

  acl.json     {"format": 1, "datasets": {name: {"owner": p, "grants": {p: ["read", "write"]}}}}
  audit.jsonl  one JSON entry per line, hash-chained (see `AuditLog`)
  audit.head   the seq and hash of the last entry: the anchor that catches a truncated tail
  .lock        `flock`ed around every read-modify-write of the three files above

Rules:
- The first principal to write a name becomes its owner; the owner may read and write
  implicitly and is the only one who may grant, revoke or transfer ownership (`transfer_owner`;
  the previous owner keeps no access unless the new owner grants it).
- "read" and "write" are separate grants: a writer who must also read needs both.
- "*" stands for every principal and may be granted "read" only: a dataset everyone may
  rewrite has no owner worth the name.
- A name nobody has written has no owner, so nobody may read it (fail closed).
- Every read, write, grant, revoke, transfer and denial is appended to the audit log, a denial
  before the error is raised. An ACL change is logged first and then applied to acl.json by the
  same function (`_apply`) that `AuditLog.verify` uses to replay the log, so acl.json is a cache
  of the log and an edit made to it by hand shows up as a difference.
- The model registry (helox.registry) appends its changes to the same log: registrations,
  promotions, refused promotions and rollbacks, under the subject `models/<name>`.

Limits: this is accountability between colleagues sharing a workspace, not a security boundary
against someone who can write the governance folder. Whoever rewrites the log, the anchor and
acl.json consistently (or deletes all three) is not detected; publishing the head hash
elsewhere (a commit message, a ticket, a registry event) and comparing it later would detect
that. `fcntl.flock` makes this module POSIX-only, and flock is advisory and unreliable on some
network file systems.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from helox.errors import HeloxError
from helox.fileio import fsync_path

PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9._@-]+$")
DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
EVERYONE = "*"
PERMISSIONS = ("read", "write")
ACTIONS = ("read", "write", "grant", "revoke", "transfer", "deny",
           "register", "promote", "refuse", "rollback")
"""Dataset access, then the model registry's changes (helox.registry.store), whose entries
name the subject `models/<name>` in the `dataset` field."""
GENESIS_HASH = "0" * 64
ACL_FORMAT = 1
ENTRY_KEYS = frozenset({"seq", "time", "principal", "action", "dataset", "version", "details",
                        "prev_hash", "hash"})
TAIL_BLOCK_BYTES = 1 << 16


class AccessDenied(HeloxError):
    """A principal lacks the permission an operation needs; already recorded in the audit log."""

    def __init__(self, message: str, hint: str, principal: str, dataset: str, missing: str,
                 owner: str | None):
        super().__init__(message, hint=hint)
        self.principal = principal
        self.dataset = dataset
        self.missing = missing
        self.owner = owner


def governance_dir(workspace: Path) -> Path:
    return Path(workspace) / "governance"


# --- principals and names --------------------------------------------------------------------


def resolve_principal(configured: str | None) -> str:
    """The acting principal: the config value, else $HELOX_PRINCIPAL, else the OS login name."""
    if configured is not None:
        return _check_principal(configured, "the configured principal")
    from_env = os.environ.get("HELOX_PRINCIPAL")
    if from_env:  # an empty variable counts as unset, as shells make that easy to do by accident
        return _check_principal(from_env, "HELOX_PRINCIPAL")
    try:
        login = getpass.getuser()
    except (OSError, KeyError) as e:  # no login variables and no passwd entry (some containers)
        raise HeloxError(f"cannot tell who is running helox: {e}",
                         hint="set HELOX_PRINCIPAL=<your name>, or the principal in the config"
                         ) from e
    return _check_principal(login, "the OS login name")


def _check_principal(principal: str, source: str = "principal") -> str:
    if not isinstance(principal, str) or not PRINCIPAL_RE.match(principal):
        raise HeloxError(f"{source} {principal!r} is not a valid principal name",
                         hint="use letters, digits and . _ @ - only, e.g. alice or alice@lab")
    return principal


def _check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not DATASET_NAME_RE.match(name):
        raise HeloxError(f"dataset name {name!r} is not valid",
                         hint="use letters, digits and . _ - only, e.g. quickstart")
    return name


def _check_permissions(permissions: Iterable[str]) -> list[str]:
    wanted = sorted(set(permissions))
    unknown = [p for p in wanted if p not in PERMISSIONS]
    if not wanted or unknown:
        raise HeloxError(f"permissions {wanted!r} are not valid",
                         hint=f"give one or more of {', '.join(PERMISSIONS)} (--read, --write)")
    return wanted


# --- files and locking -----------------------------------------------------------------------


@contextmanager
def _locked(gov_dir: Path, shared: bool = False) -> Iterator[None]:
    """Hold the governance lock; exclusive for writers, shared for readers.

    Hand-written on fcntl.flock rather than the `filelock` package: that is not a declared
    dependency, and flock's "released when the process dies" is what we need after a crash.
    Not re-entrant: public functions take it once and call the unlocked helpers below.
    """
    gov_dir.mkdir(parents=True, exist_ok=True)
    with open(gov_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _write_atomic(path: Path, data: dict, sync_dir: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_path(path.parent)


def _canonical(obj: dict) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII only; the bytes that get hashed.

    Hand-written because entries hold only strings, ints, bools, lists and dicts, for which
    this is already byte-stable; RFC 8785 libraries exist but none is a dependency.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry_hash(entry: dict) -> str:
    """sha256 of the canonical JSON of the entry without its `hash` (prev_hash included)."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


# --- the audit log ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int | None
    """1-based line of audit.jsonl; None for a problem of the log as a whole."""
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass
class VerifyReport:
    num_entries: int
    """Well-formed entries read from the log."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"audit log OK: {self.num_entries} entries, chain and anchor intact"
        lines = [f"audit log FAILED verification ({len(self.problems)} problems):"]
        return "\n".join(lines + [f"  {p}" for p in self.problems])


class AuditLog:
    """`<governance>/audit.jsonl`: append-only, hash-chained JSON lines, anchored by audit.head.

    Each entry is {seq, time, principal, action, dataset, version, details, prev_hash, hash};
    seq counts from 1, prev_hash is the previous entry's hash (64 zeros for the first) and
    hash = `entry_hash(entry)`. A chain alone cannot show that its last entries were cut off,
    so every append also rewrites audit.head with the last seq and hash, under the same lock.
    """

    def __init__(self, gov_dir: Path):
        self.gov_dir = Path(gov_dir)
        self.path = self.gov_dir / "audit.jsonl"
        self.head_path = self.gov_dir / "audit.head"

    def append(self, principal: str, action: str, dataset: str, version: str | None = None,
               details: dict | None = None) -> dict:
        with _locked(self.gov_dir):
            return self._append(principal, action, dataset, version, details)

    def entries(self, dataset: str | None = None, principal: str | None = None) -> Iterator[dict]:
        """Well-formed entries, oldest first; `principal` matches the actor or a grant's target."""
        with _locked(self.gov_dir, shared=True):
            parsed = [e for _, e in self._numbered() if isinstance(e, dict)]
        for entry in parsed:
            if dataset is not None and entry["dataset"] != dataset:
                continue
            if principal is not None and principal not in (
                    entry["principal"], entry["details"].get("target"), entry["details"].get("to")):
                continue
            yield entry

    def verify(self) -> VerifyReport:
        """Check the chain line by line, the anchor, and that acl.json matches the log's replay."""
        with _locked(self.gov_dir, shared=True):
            report, entries = VerifyReport(0), []
            last_seq, last_hash = 0, GENESIS_HASH
            for number, entry in self._numbered():
                if isinstance(entry, str):
                    report.problems.append(Problem(number, f"malformed entry: {entry}"))
                    continue
                report.problems += _check_link(number, entry, last_seq, last_hash)
                if entry["seq"] > last_seq:  # an out-of-order entry does not move the chain on
                    last_seq, last_hash = entry["seq"], entry["hash"]
                entries.append((number, entry))
            report.num_entries = len(entries)
            report.problems += self._check_anchor(last_seq, last_hash)
            report.problems += _check_acl_replay(self.gov_dir, entries)
        return report

    def _append(self, principal: str, action: str, dataset: str, version: str | None,
                details: dict | None) -> dict:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}; expected one of {ACTIONS}")
        last, torn = _tail(self.path)
        entry = {"seq": last["seq"] + 1 if last else 1,
                 "time": datetime.now(timezone.utc).isoformat(),
                 "principal": principal, "action": action, "dataset": dataset,
                 "version": version, "details": details or {},
                 "prev_hash": last["hash"] if last else GENESIS_HASH}
        entry["hash"] = entry_hash(entry)
        with open(self.path, "ab") as f:
            # After a torn write the partial line stays (verify reports it) but must not swallow
            # the new entry.
            f.write((b"\n" if torn else b"") + _canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        # No folder fsync per append: after a crash an older anchor is reported by verify as
        # "anchor behind the log", which is true and harmless.
        _write_atomic(self.head_path, {"seq": entry["seq"], "hash": entry["hash"]},
                      sync_dir=False)
        return entry

    def _numbered(self) -> Iterator[tuple[int, dict | str]]:
        """(line number, entry) for each line; a string instead of the entry says why not."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield number, _parse_entry(raw)

    def _check_anchor(self, last_seq: int, last_hash: str) -> list[Problem]:
        if not self.head_path.exists():
            if last_seq == 0:
                return []
            return [Problem(None, "audit.head is missing, so a truncated tail cannot be ruled "
                                  "out (it is written by every append)")]
        try:
            head = json.loads(self.head_path.read_text())
            head_seq, head_hash = int(head["seq"]), str(head["hash"])
        except (ValueError, KeyError, TypeError) as e:
            return [Problem(None, f"audit.head is malformed ({e})")]
        if head_seq > last_seq:
            return [Problem(None, f"the log ends at seq {last_seq} but audit.head records seq "
                                  f"{head_seq}: the last {head_seq - last_seq} entries were "
                                  f"deleted (tail truncation)")]
        if head_seq < last_seq:
            return [Problem(None, f"audit.head records seq {head_seq} but the log goes on to seq "
                                  f"{last_seq}: entries were appended without helox (by hand), "
                                  f"or a crash hit between an entry and its anchor")]
        if head_hash != last_hash:
            return [Problem(None, f"the last entry (seq {last_seq}) does not match the hash in "
                                  f"audit.head: it was rewritten")]
        return []


def _parse_entry(raw: bytes) -> dict | str:
    try:
        entry = json.loads(raw)
    except ValueError as e:
        return f"not JSON ({e})"
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        return f"not an audit entry (expected the keys {sorted(ENTRY_KEYS)})"
    if type(entry["seq"]) is not int or not isinstance(entry["details"], dict):
        return "seq must be an integer and details an object"
    if not all(isinstance(entry[k], str) for k in ("hash", "prev_hash", "principal", "action")):
        return "hash, prev_hash, principal and action must be strings"
    return entry


def _check_link(number: int, entry: dict, prev_seq: int, prev_hash: str) -> list[Problem]:
    seq, problems = entry["seq"], []
    if entry_hash(entry) != entry["hash"]:
        problems.append(Problem(number, f"entry seq {seq} was edited: its content does not match "
                                        f"its hash"))
    if seq <= prev_seq:
        problems.append(Problem(number, f"entry seq {seq} comes after seq {prev_seq}: entries were "
                                        f"reordered or duplicated"))
    elif seq > prev_seq + 1:
        missing = f"{prev_seq + 1}" if seq == prev_seq + 2 else f"{prev_seq + 1}..{seq - 1}"
        problems.append(Problem(number, f"entry seq {missing} is missing before this line "
                                        f"(deleted or moved)"))
    elif entry["prev_hash"] != prev_hash:
        problems.append(Problem(number, f"prev_hash does not match the entry before it (seq "
                                        f"{prev_seq}): that entry was rewritten, or this one "
                                        f"forged"))
    return problems


def _tail(path: Path) -> tuple[dict | None, bool]:
    """The last well-formed entry, read backwards from the end, and whether the file lacks a
    final newline (a torn write). Reading backwards keeps an append O(1) in the log's length."""
    if not path.exists() or path.stat().st_size == 0:
        return None, False
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        f.seek(pos - 1)
        torn = f.read(1) != b"\n"
        partial = b""
        while pos > 0:
            step = min(TAIL_BLOCK_BYTES, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + partial).split(b"\n")
            partial = lines.pop(0) if pos > 0 else b""  # may be cut; finish it next round
            for raw in reversed(lines):
                entry = _parse_entry(raw) if raw else None
                if isinstance(entry, dict):
                    return entry, torn
    return None, torn


# --- the ACL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetAcl:
    owner: str
    """The principal who wrote the name first, or received it by `transfer_owner`."""
    grants: dict[str, list[str]]
    """Principal (or "*") -> sorted permissions granted by the owner."""

    def permissions_of(self, principal: str) -> frozenset[str]:
        if principal == self.owner:
            return frozenset(PERMISSIONS)
        return frozenset(self.grants.get(principal, [])) | frozenset(self.grants.get(EVERYONE, []))


def _load_acl(gov_dir: Path) -> dict[str, dict]:
    path = gov_dir / "acl.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != ACL_FORMAT or not isinstance(data.get("datasets"), dict):
            raise ValueError(f"expected format {ACL_FORMAT} with a 'datasets' object")
    except (ValueError, AttributeError) as e:
        raise HeloxError(f"{path} is not a valid access-control file: {e}",
                         hint="restore it from a backup; `helox data audit --verify` shows the "
                              "grants the audit log records") from e
    return data["datasets"]


def _save_acl(gov_dir: Path, datasets: dict[str, dict]) -> None:
    _write_atomic(gov_dir / "acl.json", {"format": ACL_FORMAT, "datasets": datasets},
                  sync_dir=True)


def _apply(datasets: dict[str, dict], entry: dict) -> None:
    """Apply one audit entry's effect on the ACL: the only code that changes who may do what."""
    action, name, details = entry["action"], entry["dataset"], entry["details"]
    if action == "write" and details.get("new_owner"):
        datasets[name] = {"owner": entry["principal"], "grants": {}}
    elif action == "transfer":
        datasets[name]["owner"] = details["to"]
        datasets[name]["grants"].pop(details["to"], None)  # implicit for an owner
    elif action in ("grant", "revoke"):
        grants, target = datasets[name]["grants"], details["target"]
        held = set(grants.get(target, ()))
        held = held | set(details["permissions"]) if action == "grant" \
            else held - set(details["permissions"])
        if held:
            grants[target] = sorted(held)
        else:
            grants.pop(target, None)


def _check_acl_replay(gov_dir: Path, entries: list[tuple[int, dict]]) -> list[Problem]:
    replayed, problems = {}, []
    for number, entry in entries:
        try:
            _apply(replayed, entry)
        except (KeyError, TypeError, AttributeError) as e:
            problems.append(Problem(number, f"cannot replay this ACL change ({e!r}): it names a "
                                            f"dataset with no owner or lacks a field"))
    try:
        stored = _load_acl(gov_dir)
    except HeloxError as e:
        return problems + [Problem(None, e.message)]
    for name in sorted(set(replayed) | set(stored)):
        if replayed.get(name) != stored.get(name):
            problems.append(Problem(None, f"acl.json for dataset {name!r} is {stored.get(name)} "
                                          f"but the audit log says {replayed.get(name)}: acl.json "
                                          f"was edited outside helox"))
    return problems


def list_acl(gov_dir: Path) -> dict[str, DatasetAcl]:
    """Every governed dataset name with its owner and grants."""
    with _locked(Path(gov_dir), shared=True):
        datasets = _load_acl(Path(gov_dir))
    return {name: DatasetAcl(d["owner"], d["grants"]) for name, d in sorted(datasets.items())}


# --- authorization ---------------------------------------------------------------------------


def authorize_write(gov_dir: Path, dataset_name: str, version: str | None,
                    principal: str) -> None:
    """Allow `principal` to write `version` of the name (the first writer becomes its owner)."""
    gov_dir = Path(gov_dir)
    _check_dataset_name(dataset_name)
    _check_principal(principal)
    with _locked(gov_dir):
        datasets, log = _load_acl(gov_dir), AuditLog(gov_dir)
        if dataset_name not in datasets:
            entry = log._append(principal, "write", dataset_name, version, {"new_owner": True})
            _apply(datasets, entry)
            _save_acl(gov_dir, datasets)
            return
        acl = DatasetAcl(**datasets[dataset_name])
        if "write" not in acl.permissions_of(principal):
            _deny(log, principal, dataset_name, version, "write", acl.owner, {})
        log._append(principal, "write", dataset_name, version, {})


def authorize_read(gov_dir: Path, dataset_name: str, version: str | None, principal: str,
                   purpose: str = "train") -> None:
    """Allow `principal` to read `version` of the name for `purpose`, or raise AccessDenied."""
    gov_dir = Path(gov_dir)
    _check_dataset_name(dataset_name)
    _check_principal(principal)
    with _locked(gov_dir):
        datasets, log = _load_acl(gov_dir), AuditLog(gov_dir)
        record = datasets.get(dataset_name)
        owner = record["owner"] if record else None
        if record is None or "read" not in DatasetAcl(**record).permissions_of(principal):
            _deny(log, principal, dataset_name, version, "read", owner, {"purpose": purpose})
        log._append(principal, "read", dataset_name, version, {"purpose": purpose})


def grant(gov_dir: Path, dataset_name: str, target: str, permissions: Iterable[str],
          by: str) -> DatasetAcl:
    """The owner `by` grants `permissions` on the name to `target` ("*" = everyone, read only)."""
    perms = _check_permissions(permissions)
    if target == EVERYONE and "write" in perms:
        raise HeloxError(f"'write' cannot be granted to everyone ('*') on {dataset_name!r}",
                         hint="grant write to named principals; '*' may only be given --read")
    return _change(Path(gov_dir), dataset_name, by, "grant",
                   {"target": _check_target(target), "permissions": perms})


def revoke(gov_dir: Path, dataset_name: str, target: str, permissions: Iterable[str],
           by: str) -> DatasetAcl:
    """The owner `by` takes `permissions` on the name away from `target`.

    A "*" grant still applies to `target` afterwards; the returned ACL shows what remains.
    """
    return _change(Path(gov_dir), dataset_name, by, "revoke",
                   {"target": _check_target(target),
                    "permissions": _check_permissions(permissions)})


def transfer_owner(gov_dir: Path, dataset_name: str, new_owner: str, by: str) -> DatasetAcl:
    """The owner `by` hands the name to `new_owner`; `by` keeps no access unless granted."""
    return _change(Path(gov_dir), dataset_name, by, "transfer",
                   {"from": by, "to": _check_principal(new_owner, "new owner")})


def _check_target(target: str) -> str:
    return target if target == EVERYONE else _check_principal(target, "grant target")


def _change(gov_dir: Path, dataset_name: str, by: str, action: str, details: dict) -> DatasetAcl:
    _check_dataset_name(dataset_name)
    _check_principal(by)
    with _locked(gov_dir):
        datasets, log = _load_acl(gov_dir), AuditLog(gov_dir)
        if dataset_name not in datasets:
            raise HeloxError(f"no dataset named {dataset_name!r} is governed yet",
                             hint=f"known names: {', '.join(sorted(datasets)) or 'none'}; a name "
                                  f"gets its owner when it is first written (helox data prepare)")
        acl = DatasetAcl(**datasets[dataset_name])
        if by != acl.owner:
            _deny(log, by, dataset_name, None, action, acl.owner, details)
        _refuse_noop(dataset_name, acl, action, details)
        entry = log._append(by, action, dataset_name, None, details)
        _apply(datasets, entry)
        _save_acl(gov_dir, datasets)
        return DatasetAcl(**datasets[dataset_name])


def _refuse_noop(dataset_name: str, acl: DatasetAcl, action: str, details: dict) -> None:
    """Refuse changes that would change nothing, so the log records only real changes."""
    target = details.get("target", details.get("to"))
    if target == acl.owner:
        raise HeloxError(f"{target!r} already owns {dataset_name!r}, which implies read and write; "
                         f"there is nothing to {action}",
                         hint="to take access away from the owner, transfer ownership first")
    if action == "revoke" and not set(details["permissions"]) & set(acl.grants.get(target, ())):
        held = acl.grants.get(target, [])
        raise HeloxError(f"{target!r} holds no {'/'.join(details['permissions'])} grant on "
                         f"{dataset_name!r} (holds: {', '.join(held) or 'nothing'})",
                         hint=f"`helox data audit --dataset {dataset_name}` lists the grants")


_VERBS = {"read": "read", "write": "write a new version of", "grant": "grant access to",
          "revoke": "revoke access to", "transfer": "transfer ownership of"}


def _deny(log: AuditLog, principal: str, dataset_name: str, version: str | None, attempted: str,
          owner: str | None, details: dict) -> None:
    """Record the denial (with the lock held), then raise AccessDenied saying how to get access."""
    missing = attempted if attempted in PERMISSIONS else "owner"
    log._append(principal, "deny", dataset_name, version,
                {**details, "attempted": attempted, "missing": missing, "owner": owner})
    verb = _VERBS[attempted]
    if owner is None:
        raise AccessDenied(
            f"principal {principal!r} may not {verb} dataset {dataset_name!r}: it has no owner "
            f"yet (missing permission: {missing})",
            hint=f"the first principal to write {dataset_name!r} (helox data prepare) becomes "
                 f"its owner and can then run `helox data grant {dataset_name} {principal} "
                 f"--read`", principal=principal, dataset=dataset_name, missing=missing, owner=None)
    raise AccessDenied(
        f"principal {principal!r} may not {verb} dataset {dataset_name!r} (missing permission: "
        f"{missing}; owner: {owner!r})",
        hint=f"ask the owner {owner!r} to run "
             f"`{_command(dataset_name, principal, attempted, details)}`",
        principal=principal, dataset=dataset_name, missing=missing, owner=owner)


def _command(dataset_name: str, principal: str, attempted: str, details: dict) -> str:
    """The command the owner runs to allow what was denied."""
    if attempted in PERMISSIONS:
        return f"helox data grant {dataset_name} {principal} --{attempted}"
    if attempted == "transfer":
        return f"helox data transfer {dataset_name} {details['to']}"
    flags = " ".join(f"--{p}" for p in details["permissions"])
    return f"helox data {attempted} {dataset_name} {details['target']} {flags}"
