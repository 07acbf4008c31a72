"""Registering SuperNode keys with the SuperLink (the chart's secure defaults).

- ``register_public_keys``: registers every key of a folder, idempotently (a key already
  registered under the same name counts as done), with the ``flwr`` CLI, under the node name
  ``<site>/<key name>`` (``<site>/slot-<k>`` for a key bound to node slot k, k spelt one way only):
  the ServerApp reads the site and the slot from it (``site_of_node``, ``slot_of_node``), so they are
  what the operator registered, never what a SuperNode claims. What would make a name or a slot
  ambiguous is refused, loudly (a line that says what to do, ``fedcifar_supernode_keys_refused_total``),
  and registered under no name: a public key in two files, two keys for one slot or one name, a slot
  spelt otherwise than ``slot-<k>``, a key the SuperLink holds under another name already;
- ``KeyRegistrar``: the ``fedcifar superlink`` side: once the SuperLink answers ``/health``,
  register the folders' keys, write a ready file (the pod's readiness probe), and keep
  registering keys that appear later (``helm upgrade --set clients.replicas=N``, or another
  site's keys added to the sites' Secret: no restart, no new run).

Environment (set by the chart): ``FEDCIFAR_ROOT_CERTIFICATES`` (the CA), ``FEDCIFAR_SUPERNODE_PUBLIC_KEYS``
(this release's public keys, registered for the site ``$FEDCIFAR_SITE``), ``FEDCIFAR_SITE_PUBLIC_KEYS``
(other sites' keys, each file named ``<site>.<key name>.pub``), ``FEDCIFAR_READY_FILE``.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedcifar.config import SITE_NAME
from fedcifar.deploy.control import control_nodes, register_public_key, registered_names, superlink_healthy
from fedcifar.deploy.flwr_cli import CONNECTION, flag_value, write_connection
from fedcifar.deploy.key_formats import openssh_public_key, public_key_files
from fedcifar.metrics import DEFAULT_SITE, KEY_REFUSAL_REASONS, SITE_ENV, UNKNOWN_SITE, superlink_metrics

ROOT_CERTIFICATES_ENV = "FEDCIFAR_ROOT_CERTIFICATES"
PUBLIC_KEYS_ENV = "FEDCIFAR_SUPERNODE_PUBLIC_KEYS"
SITE_KEYS_ENV = "FEDCIFAR_SITE_PUBLIC_KEYS"
OFFSET_ENV = "FEDCIFAR_PARTITION_OFFSET"  # this release's first node slot
READY_FILE_ENV = "FEDCIFAR_READY_FILE"
SLOT_NAME = re.compile(r"slot-(0|[1-9][0-9]*)")  # the one spelling of a key name bound to node slot k
SLOT_LIKE = re.compile(r"slot(?![a-z])", re.IGNORECASE | re.ASCII)  # key names that read as a slot binding
ORDINAL = re.compile(r"supernode-([0-9]+)")  # pod i's public key in this release's Secret
CANONICAL = re.compile(r"0|[1-9][0-9]*")
NO_SLOT = -1  # the slot of a key registered under a slot name spelt otherwise: bound, to no slot of any run
SLOT_HINT = (
    "a key bound to node slot k is named <site>.slot-<k>.pub, k in decimal without sign, space or leading "
    "zero (hospital-a.slot-7.pub, not slot-007): rename the file (any other name binds no slot)"
)


@dataclass(frozen=True)
class NamedKey:
    """A file of a ``KeyFolder``: the node name it registers, or why its name is refused."""

    path: Path
    name: str | None  # ``<site>/<key name>``; None where the file's name says no site
    refusal: tuple[str, str] | None = None  # (reason, what to do), when its name is refused


@dataclass(frozen=True)
class KeyFolder:
    """A folder of SuperNode public keys and the site they belong to; ``site=None``: every file is
    named ``<site>.<key name>.pub`` (the sites' Secret on the SuperLink side). With ``offset``, this
    release's ``supernode-<i>.pub`` is registered as ``<site>/slot-<offset + i>``: the key of pod i
    holds that node slot and no other (``slot_of_node``)."""

    path: Path
    site: str | None = None
    offset: int | None = None

    def named_files(self) -> list[NamedKey]:
        """Every file, named ``<site>/<key name>``, or refused: a name that says no site, a slot spelt
        otherwise than ``slot-<k>`` (``slot_of_node`` would bind it to no slot)."""
        named = []
        for path in public_key_files(self.path):
            site, key = (self.site, path.stem) if self.site else path.stem.partition(".")[::2]
            if self.offset is not None and (ordinal := ORDINAL.fullmatch(key)):
                if not CANONICAL.fullmatch(ordinal.group(1)):
                    hint = (
                        "pod i's key is supernode-<i>.pub, i in decimal without leading zero "
                        "(it holds slot-<k>, k = offset + i)"
                    )
                    named.append(NamedKey(path, None, ("non_canonical_slot", hint)))
                    continue
                key = f"slot-{self.offset + int(ordinal.group(1))}"
            if not (SITE_NAME.fullmatch(site) and key and (self.site or path.suffix == ".pub")):
                hint = "name it <site>.<key name>.pub, the site a DNS label (hospital-a.slot-0.pub)"
                named.append(NamedKey(path, None, ("bad_name", hint)))
            elif slot_of_node(name := f"{site}/{key}") == NO_SLOT:
                named.append(NamedKey(path, name, ("non_canonical_slot", SLOT_HINT)))
            else:
                named.append(NamedKey(path, name))
        return named


def site_of_node(name: str) -> str:
    """The site of a node registered as ``<site>/<key name>`` (the part before the first ``/``, when
    it is a DNS label); ``unknown`` for other names, and for nodes registered without one."""
    site = name.partition("/")[0]
    return site if SITE_NAME.fullmatch(site) else UNKNOWN_SITE


def slot_of_node(name: str) -> int | None:
    """The node slot a key registered as ``<site>/slot-<k>`` holds, k in decimal (ASCII digits, no sign,
    space or leading zero); ``NO_SLOT`` (-1, no run's) for a key name that reads as a slot spelt otherwise
    (``slot-007``, ``slot-+7``, ``Slot-7``, ``slot7``; the registrar refuses them, so only a key registered
    by hand has one): it answers for no slot, rather than for the one ``int`` reads in it; None for
    other names (bound to no slot)."""
    site, _, key = name.partition("/")
    if not site or not SLOT_LIKE.match(key):
        return None
    bound = SLOT_NAME.fullmatch(key)
    return int(bound.group(1)) if bound else NO_SLOT


def own_key_folder(path: Path) -> KeyFolder:
    """This release's keys, registered for its site (``$FEDCIFAR_SITE``), each bound to its pod's slot
    (``$FEDCIFAR_PARTITION_OFFSET`` + ordinal)."""
    return KeyFolder(path, os.environ.get(SITE_ENV) or DEFAULT_SITE, int(os.environ.get(OFFSET_ENV) or 0))


def register_missing_public_keys(folder: KeyFolder, flwr_home: Path) -> list[str]:
    """``register_public_keys`` unless the SuperLink lists every node name of the folder already (the
    usual case: its own registrar was first), which keeps "already in use" errors out of its log."""
    try:
        listed = {node.name for node in control_nodes()}
    except Exception:  # noqa: BLE001 - unreachable or refused: registering says why
        listed = set()
    names = [named.name for named in folder.named_files() if not named.refusal]
    if set(names) <= listed:
        print(f"fedcifar: the SuperLink lists all {len(names)} SuperNode keys of {folder.path}", flush=True)
        return []
    return register_public_keys([folder], flwr_home)


def refuse(refused: set[str], said: str, reason: str, line: str) -> None:
    """Log ``line`` and count ``reason``, once for ``said`` (what it is about, as ``refused`` holds it)."""
    if said in refused:
        return
    refused.add(said)
    print(f"fedcifar: {line} (refused: {reason})", flush=True)
    superlink_metrics().keys_refused.labels(reason).inc()


def collisions(entries: list[tuple[NamedKey, bytes, str]], refused: set[str]) -> set[str]:
    """The files (``seen``) of ``entries`` (file, OpenSSH key, ``seen``) that share a public key, a slot or
    a node name with another: which of them is the owner's only the operator can say, so none is
    registered; each collision is said and counted once."""
    relations = (
        ("same_key", lambda named, key: key),
        ("same_slot", lambda named, key: slot_of_node(named.name)),
        ("same_name", lambda named, key: named.name if slot_of_node(named.name) is None else None),
    )
    clashing = set()
    for reason, of in relations:
        groups = defaultdict(list)
        for named, key, seen in entries:
            if (shared := of(named, key)) is not None:
                groups[shared].append((named, key, seen))
        for shared, members in groups.items():
            if len(members) < 2:
                continue
            clashing.update(seen for _, _, seen in members)
            if reason != "same_key" and len({key for _, key, _ in members}) < 2:
                continue  # one key in several files: said as such
            files = ", ".join(f"{named.path} ({named.name})" for named, _, _ in members)
            what = {
                "same_key": "hold one public key, which is one node; neither is registered (one the SuperLink "
                "took before keeps its name): delete the file that does not name the key's owner (a site "
                "that hands in another site's key would take that node's name and slot)",
                "same_slot": f"bind {len(members)} keys to slot {shared}, which one node holds; neither is "
                f"registered: delete the file of the key that does not hold slot {shared}",
                "same_name": f"name {len(members)} keys {shared}; neither is registered: delete or rename all "
                "but the one that node signs with",
            }[reason]
            said = f"{reason}:" + "|".join(sorted(seen for _, _, seen in members))
            refuse(refused, said, reason, f"SuperNode keys {files} not registered: they {what}")
    return clashing


def register_public_keys(
    folders: list[KeyFolder], flwr_home: Path, done: set[str] | None = None, refused: set[str] | None = None
) -> list[str]:
    """Register every key of ``folders`` not in ``done`` (key contents); returns the new file names.

    Refused, with a line that says why and what to do, counted in ``fedcifar_supernode_keys_refused_total``
    and said once (``refused`` holds what was said), not registered: a file that is no usable key, or
    whose name says no site or spells a slot otherwise than ``slot-<k>``; files that share a public key,
    a slot or a node name, each of them (``collisions``); a key the SuperLink holds under another name
    already (Flower answers "already in use", and keeps the first name). A key the SuperLink did not
    take is tried again on the next call: every other key is tried first, then a RuntimeError names the
    ones that failed."""
    done = set() if done is None else done
    refused = set() if refused is None else refused
    entries = []
    for folder in folders:
        for named in folder.named_files():
            data = named.path.read_bytes()
            seen = f"{named.path}:{hashlib.sha256(data).hexdigest()}"
            try:
                openssh = openssh_public_key(data)
            except ValueError as err:
                refuse(refused, seen, "not_a_key", f"SuperNode key {named.path.name} not registered: {err}")
                continue
            if named.refusal:
                reason, hint = named.refusal
                called = f" ({named.name})" if named.name else ""
                refuse(refused, seen, reason, f"SuperNode key {named.path.name}{called} not registered: {hint}")
                continue
            entries.append((named, openssh, seen))
    clashing = collisions(entries, refused)
    new, failed, listed = [], [], None
    for named, openssh, seen in entries:
        fingerprint = openssh.decode()
        if seen in clashing or seen in refused or fingerprint in done:
            continue
        try:
            outcome = register_public_key(openssh, flwr_home, named.name)
            if outcome == "already registered":
                listed = registered_names(flwr_home) if listed is None else listed
                if (other := listed.get(openssh)) != named.name:
                    called = f"as {other}" if other else "under a name it does not list"
                    refuse(
                        refused,
                        seen,
                        "registered_as_other",
                        f"SuperNode key {named.path.name} ({named.name}) not registered: the SuperLink holds this "
                        f"public key {called} already, and its node signs in as that, not as {named.name} (Flower "
                        "keeps a key's first name, and never registers a key again): delete the file, or give "
                        "that node a new key",
                    )
                    continue
        except (RuntimeError, subprocess.SubprocessError) as err:
            failed.append(f"{named.path.name}: {err}")
            continue
        print(f"fedcifar: SuperNode key {named.path.name} ({named.name}): {outcome}", flush=True)
        done.add(fingerprint)
        new.append(named.path.name)
    if failed:
        raise RuntimeError("; ".join(failed))
    return new


class KeyRegistrar(threading.Thread):
    """Registers folders of SuperNode public keys with the local SuperLink, then keeps watching.

    Writes ``ready_file`` once every key present at start is registered (removed first, since a
    restarted container keeps the pod's emptyDir); a key that fails is retried on the next scan.
    """

    def __init__(
        self,
        *,
        port: int,
        root_certificates: str,
        keys: list[KeyFolder],
        flwr_home: Path,
        ready_file: Path | None,
        interval: float = 5.0,
    ) -> None:
        super().__init__(name="supernode-key-registrar", daemon=True)
        self.address = f"127.0.0.1:{port}"
        self.root_certificates, self.keys, self.flwr_home = root_certificates, keys, flwr_home
        self.ready_file, self.interval = ready_file, interval
        self.registered: set[str] = set()
        self.refused: set[str] = set()  # files that hold no usable key, said once
        self.stopped = threading.Event()
        if ready_file:
            ready_file.unlink(missing_ok=True)

    def run(self) -> None:
        refusals = superlink_metrics().keys_refused
        for reason in KEY_REFUSAL_REASONS:  # zero series: a refusal shows as an increase, alerts see it
            refusals.labels(reason)
        write_connection(self.flwr_home, CONNECTION, self.address, self.root_certificates)
        while not self.stopped.is_set() and not superlink_healthy(self.address, self.root_certificates):
            self.stopped.wait(0.5)
        ready = False
        while not self.stopped.is_set():
            try:
                register_public_keys(self.keys, self.flwr_home, self.registered, self.refused)
                if not ready and self.ready_file:
                    self.ready_file.parent.mkdir(parents=True, exist_ok=True)
                    self.ready_file.write_text(f"{len(self.registered)} SuperNode keys registered\n")
                    print(f"fedcifar: {len(self.registered)} SuperNode keys registered; ready", flush=True)
                ready = True
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as err:  # e.g. a hung flwr
                print(f"fedcifar: registering SuperNode keys failed (retrying): {err}", flush=True)
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()


def superlink_registrar(command: list[str], run_dir: Path) -> KeyRegistrar | None:
    """A ``KeyRegistrar`` for a ``flower-superlink`` command with ``--enable-supernode-auth``, when
    ``$FEDCIFAR_SUPERNODE_PUBLIC_KEYS`` or ``$FEDCIFAR_SITE_PUBLIC_KEYS`` name keys to register
    (else None: register by hand). Its ``flwr`` home goes in ``run_dir``, a folder private to this
    process (``node.run_node``'s ``tempfile.mkdtemp()``)."""
    own, sites = os.environ.get(PUBLIC_KEYS_ENV), os.environ.get(SITE_KEYS_ENV)
    keys = ([own_key_folder(Path(own))] if own else []) + ([KeyFolder(Path(sites))] if sites else [])
    if "--enable-supernode-auth" not in command or not keys:
        return None
    ca = flag_value(command, "--ssl-ca-certfile")
    if not ca:
        raise ValueError("--enable-supernode-auth needs TLS: pass --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile")
    ready = os.environ.get(READY_FILE_ENV)
    return KeyRegistrar(
        port=int(flag_value(command, "--port") or 8000),
        root_certificates=ca,
        keys=keys,
        flwr_home=run_dir / "registrar-flwr",
        ready_file=Path(ready) if ready else None,
    )
