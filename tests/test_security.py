"""TLS and SuperNode authentication against a real Flower SuperLink (local processes, no cluster).

``fedcifar superlink`` with TLS and ``--enable-supernode-auth`` registers the public keys of a folder
and writes its ready file; a SuperNode with a registered key (PEM, as Helm generates it) gets in,
one with an unregistered key is refused, and one speaking plaintext never gets in.
"""

from __future__ import annotations

import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import REGISTRY
from support import BIN, FLOWER_ENV, scrape, secure_superlink, value, wait

from fedcifar.deploy import control, flwr_cli, key_formats, registrar, submit
from fedcifar.deploy.pki import certificate, pem_private, write_pki
from fedcifar.local.federation import free_port

# ---------------------------------------------------------------------------------------------
# keys and certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, and three SuperNode keys (PEM, as Helm makes them)."""
    return write_pki(tmp_path_factory.mktemp("pki"))


def test_private_keys_in_pem_and_openssh(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for i, data in enumerate((pem_private(key), pkcs8)):
        (tmp_path / f"k{i}").write_bytes(data)
        converted = key_formats.openssh_private_key(tmp_path / f"k{i}", tmp_path / f"out{i}")
        assert b"BEGIN OPENSSH PRIVATE KEY" in converted.read_bytes()
        assert converted.stat().st_mode & 0o777 == 0o600
        loaded = serialization.load_ssh_private_key(converted.read_bytes(), None)  # what Flower does
        assert loaded.private_numbers() == key.private_numbers()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ValueError, match="must be ECDSA"):
        key_formats.load_private_key(pem_private(rsa_key))
    with pytest.raises(ValueError, match="not an unencrypted OpenSSH or PEM private key"):
        key_formats.load_private_key(b"garbage")


def test_public_keys_from_every_format(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    ssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = certificate("n", key).public_bytes(serialization.Encoding.PEM)
    assert {key_formats.openssh_public_key(d) for d in (ssh, ssh + b" comment\n", pem, cert)} == {ssh}
    (tmp_path / "..data").mkdir()  # Kubernetes' secret volume layout
    (tmp_path / "supernode-0.pub").write_bytes(cert)
    (tmp_path / ".hidden").write_bytes(b"x")
    assert [p.name for p in key_formats.public_key_files(tmp_path)] == ["supernode-0.pub"]


def test_private_key_argument_is_rewritten_only_for_pem(pki, tmp_path):
    command = ["flower-supernode", "--auth-supernode-private-key", str(pki / "supernode-0.key"), "--insecure"]
    rewritten = key_formats.rewrite_private_key_arg(command, tmp_path)
    assert rewritten[2] == str(tmp_path / "supernode-auth.key") and rewritten[3] == "--insecure"
    assert (
        key_formats.rewrite_private_key_arg([*command[:2], rewritten[2]], tmp_path)[2] == rewritten[2]
    )  # OpenSSH: kept
    assert key_formats.rewrite_private_key_arg(["flower-supernode", "--insecure"], tmp_path) == [
        "flower-supernode",
        "--insecure",
    ]


def test_connection_with_root_certificates(tmp_path):
    path = flwr_cli.write_connection(tmp_path, "fedcifar", "svc:8000", "/etc/fedcifar/tls/ca.crt")
    assert tomllib.loads(path.read_text())["superlink"]["fedcifar"] == {
        "address": "svc:8000",
        "root-certificates": "/etc/fedcifar/tls/ca.crt",
    }
    assert control.health_url("svc:8000", "/ca.crt") == "https://svc:8000/health"


# ---------------------------------------------------------------------------------------------
# what the registrar refuses (Flower's registration as a fake: a key registers once, under its first name)


def ssh_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fake_flower(monkeypatch) -> dict[bytes, str]:
    """``register_public_key`` and the SuperLink's node list as Flower 1.42 answers them: a public key
    registers once, under the name it was first given; registering it again is "already in use"."""
    nodes: dict[bytes, str] = {}

    def register(openssh: bytes, flwr_home: Path, name: str, connection: str = flwr_cli.CONNECTION) -> str:
        if openssh in nodes:
            return "already registered"
        nodes[openssh] = name
        return "registered"

    monkeypatch.setattr(registrar, "register_public_key", register)
    monkeypatch.setattr(registrar, "registered_names", lambda flwr_home: dict(nodes), raising=False)
    return nodes


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("fedcifar_supernode_keys_refused_total", {"reason": reason}) or 0.0


def test_a_key_in_two_files_registers_neither_and_says_which(tmp_path, monkeypatch, capsys):
    """A site that hands in another site's public key under its own name: after a restart without
    persistence the registrar used to register whichever file sorted first (here the thief's, which then
    held the victim node's name and slot), and skip the other without a word."""
    nodes = fake_flower(monkeypatch)
    sites = tmp_path / "sites"
    sites.mkdir()
    victim, other = ssh_key(), ssh_key()
    (sites / "hospital-a.slot-0.pub").write_bytes(victim)
    (sites / "aaa.slot-9.pub").write_bytes(victim)  # sorts first
    (sites / "hospital-b.slot-1.pub").write_bytes(other)
    before = refusals("same_key")
    done, refused = set(), set()
    folders = [registrar.KeyFolder(sites)]
    assert registrar.register_public_keys(folders, tmp_path / "home", done, refused) == ["hospital-b.slot-1.pub"]
    assert nodes == {other: "hospital-b/slot-1"}  # neither of the colliding files: the victim's key is not taken
    said = [line for line in capsys.readouterr().out.splitlines() if "same_key" in line]
    assert len(said) == 1 and "aaa.slot-9.pub" in said[0] and "hospital-a.slot-0.pub" in said[0]
    assert "neither is registered" in said[0] and "delete" in said[0]  # what to do
    assert refusals("same_key") == before + 1
    registrar.register_public_keys(folders, tmp_path / "home", done, refused)  # the next scan: said once
    assert "same_key" not in capsys.readouterr().out and refusals("same_key") == before + 1
    (sites / "aaa.slot-9.pub").unlink()  # the operator removes the thief's file: the owner's registers
    assert registrar.register_public_keys(folders, tmp_path / "home", done, refused) == ["hospital-a.slot-0.pub"]
    assert nodes[victim] == "hospital-a/slot-0"


def test_two_keys_for_one_slot_and_slot_names_spelt_otherwise_are_refused(tmp_path, monkeypatch, capsys):
    nodes = fake_flower(monkeypatch)
    own, sites = tmp_path / "own", tmp_path / "sites"
    own.mkdir(), sites.mkdir()
    keys = {}
    for folder, name in [
        (own, "supernode-0.pub"),  # site-a/slot-3 (offset 3): the chart's naming
        (own, "supernode-1.pub"),  # site-a/slot-4 ...
        (sites, "site-b.slot-4.pub"),  # ... which site B's key claims too: neither
        (own, "supernode-02.pub"),  # not an ordinal the chart writes
        (sites, "site-c.slot-007.pub"),
        (sites, "site-c.slot-+8.pub"),
        (sites, "site-c.slot- 9.pub"),
        (sites, "site-c.Slot-10.pub"),
        (sites, "site-c.slot-\u0661\u0661.pub"),  # Arabic-Indic digits: int() reads 11
        (sites, "site-c.slot-12.old.pub"),
        (sites, "site-d.slot-12.pub"),  # fine
        (sites, "site-d.slot-0.pub"),  # fine: slot 0 is spelt 0
        (sites, "site-d.supernode-7.pub"),  # fine: a name bound to no slot
    ]:
        keys[name] = ssh_key()
        (folder / name).write_bytes(keys[name])
    before = {reason: refusals(reason) for reason in ("same_slot", "non_canonical_slot")}
    folders = [registrar.KeyFolder(own, "site-a", offset=3), registrar.KeyFolder(sites)]
    new = registrar.register_public_keys(folders, tmp_path / "home")
    assert sorted(new) == ["site-d.slot-0.pub", "site-d.slot-12.pub", "site-d.supernode-7.pub", "supernode-0.pub"]
    assert sorted(nodes.values()) == ["site-a/slot-3", "site-d/slot-0", "site-d/slot-12", "site-d/supernode-7"]
    out = capsys.readouterr().out
    (clash,) = [line for line in out.splitlines() if "same_slot" in line]
    assert "supernode-1.pub" in clash and "site-b.slot-4.pub" in clash and "slot 4" in clash
    assert "neither is registered" in clash
    odd = [line for line in out.splitlines() if "non_canonical_slot" in line]
    assert len(odd) == 7 and all("slot-<k>" in line for line in odd)  # how to name it
    assert refusals("same_slot") == before["same_slot"] + 1
    assert refusals("non_canonical_slot") == before["non_canonical_slot"] + 7


def test_only_the_canonical_slot_name_binds_a_slot():
    assert registrar.slot_of_node("site-a/slot-7") == 7 and registrar.slot_of_node("local/slot-0") == 0
    assert registrar.slot_of_node("site-a/slot-12") == 12
    for spelt in ("slot-007", "slot-00", "slot-+7", "slot- 7", "slot-7 ", "Slot-7", "SLOT-7", "slot_7", "slot7"):
        # bound, to no slot of any run (it answers for none), rather than to 7 or to none at all
        assert registrar.slot_of_node(f"site-a/{spelt}") == registrar.NO_SLOT, spelt
    assert registrar.slot_of_node("site-a/slot-\u0667") == registrar.NO_SLOT  # int() reads 7
    assert registrar.slot_of_node("site-b/supernode-7") is None  # another name: bound to no slot
    assert registrar.slot_of_node("slot-7") is None and registrar.slot_of_node("/slot-7") is None


# ---------------------------------------------------------------------------------------------
# a real SuperLink


def nodes(flwr_home: Path) -> list[dict]:
    reply = flwr_cli.flwr_json("supernode", "ls", flwr_cli.CONNECTION, env=FLOWER_ENV, flwr_home=flwr_home)
    assert reply["success"], reply
    return reply["nodes"]


def registered_names(flwr_home: Path, monkeypatch) -> set[str]:
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    return {node.name for node in control.control_nodes()}


@pytest.fixture(scope="module")
def superlink(pki, tmp_path_factory):
    """``fedcifar superlink`` with TLS and SuperNode auth; keys 0 and 1 in its folder, 2 not."""
    work = tmp_path_factory.mktemp("superlink")
    keys = work / "keys"
    keys.mkdir()
    for i in (0, 1):
        (keys / f"supernode-{i}.pub").write_bytes((pki / "public" / f"supernode-{i}.pub").read_bytes())
    port, metrics_port, ready = free_port(), free_port(), work / "run" / "ready"
    env = {
        **FLOWER_ENV,
        registrar.PUBLIC_KEYS_ENV: str(keys),
        registrar.READY_FILE_ENV: str(ready),
        registrar.SITE_KEYS_ENV: str(work / "sites"),
        "FEDCIFAR_SITE": "site-a",
        "FLWR_HOME": str(work / "flwr"),
    }
    proc = subprocess.Popen(
        secure_superlink(pki, port, metrics_port, work / "run" / "metrics"),
        cwd=work,
        env=env,
        stdout=open(work / "superlink.log", "w"),
        stderr=subprocess.STDOUT,
    )
    admin = work / "admin"
    flwr_cli.write_connection(admin, flwr_cli.CONNECTION, f"127.0.0.1:{port}", str(pki / "ca.crt"))
    try:
        wait("the ready file (keys registered)", ready.exists, 90)
        yield {
            "port": port,
            "metrics_port": metrics_port,
            "admin": admin,
            "work": work,
            "keys": keys,
            "sites": work / "sites",
        }
    finally:
        proc.terminate()
        proc.wait(30)


def supernode(pki, superlink, *args: str) -> subprocess.Popen:
    log = superlink["work"] / f"supernode-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{superlink['port']}",
            "--port",
            str(free_port()),
            *args,
        ],
        env={**FLOWER_ENV, "FLWR_HOME": str(superlink["work"] / "node-home")},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    proc.log = log
    return proc


def test_superlink_serves_https_only_and_registered_the_keys(pki, superlink):
    address = f"127.0.0.1:{superlink['port']}"
    assert control.superlink_healthy(address, str(pki / "ca.crt"))
    assert not control.superlink_healthy(address)  # plain http is not served
    registered = nodes(superlink["admin"])
    assert len(registered) == 2 and {n["status"] for n in registered} == {"registered"}


def test_registered_node_gets_in_unregistered_and_plaintext_do_not(pki, superlink, tmp_path, monkeypatch):
    ca = str(pki / "ca.crt")
    key0 = key_formats.rewrite_private_key_arg(["--auth-supernode-private-key", str(pki / "supernode-0.key")], tmp_path)
    good = supernode(pki, superlink, "--root-certificates", ca, *key0)
    unregistered = supernode(
        pki,
        superlink,
        "--root-certificates",
        ca,
        *key_formats.rewrite_private_key_arg(
            ["--auth-supernode-private-key", str(pki / "supernode-2.key")], tmp_path / "2"
        ),
    )
    anonymous = supernode(pki, superlink, "--root-certificates", ca)  # TLS, but no key at all
    plaintext = supernode(pki, superlink, "--insecure", "--max-wait-time", "8")
    try:
        online = wait(
            "the registered node online", lambda: [n for n in nodes(superlink["admin"]) if n["status"] == "online"], 60
        )
        assert len(online) == 1
        monkeypatch.setenv("FLWR_HOME", str(superlink["admin"]))  # what the run Job of a server release waits on
        assert submit.online_nodes() == ["site-a/slot-0"]  # the name it was registered under: its site and slot
        assert submit.nodes_online(1)() and not submit.nodes_online(2)()
        assert unregistered.wait(60) != 0
        assert "[code: 2004] Failed to activate SuperNode." in unregistered.log.read_text()  # not registered
        assert anonymous.wait(60) != 0  # self-registration is off with --enable-supernode-auth
        assert "must be registered via the CLI" in anonymous.log.read_text()
        assert plaintext.wait(60) != 0  # an HTTP request to the HTTPS port never gets an answer
        assert "Giving up reconnection" in plaintext.log.read_text()
        assert len(nodes(superlink["admin"])) == 2  # nobody else got registered
        assert good.poll() is None
    finally:
        for proc in (good, unregistered, anonymous, plaintext):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)


def test_submit_registers_only_what_is_missing(pki, superlink, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.mkdir()
    for i in (0, 1):
        (keys / f"supernode-{i}.pub").write_bytes((pki / "public" / f"supernode-{i}.pub").read_bytes())
    monkeypatch.setenv("FLWR_HOME", str(superlink["admin"]))  # as in the run Job
    own = registrar.KeyFolder(keys, "site-a", offset=0)
    assert registrar.register_missing_public_keys(own, superlink["admin"]) == []  # listed by name already
    # helm upgrade: a new client
    (keys / "supernode-2.pub").write_bytes((pki / "public" / "supernode-2.pub").read_bytes())
    assert registrar.register_missing_public_keys(own, superlink["admin"]) == [
        "supernode-0.pub",
        "supernode-1.pub",
        "supernode-2.pub",
    ]  # 0 and 1: "already registered"
    assert "site-a/slot-2" in {node.name for node in control.control_nodes()}


def test_a_key_added_later_is_registered_by_the_superlink(pki, superlink):
    key = ec.generate_private_key(ec.SECP256R1())
    (superlink["keys"] / "supernode-3.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    wait("the fourth key registered", lambda: len(nodes(superlink["admin"])) == 4, 30)


def test_other_sites_keys_are_registered_under_their_site_while_the_superlink_runs(superlink, monkeypatch):
    """The operator adds a site's keys to the sites' folder (a Secret volume): registered, no restart."""
    before = len(nodes(superlink["admin"]))
    superlink["sites"].mkdir(exist_ok=True)
    (superlink["sites"] / "a-garbage.key.pub").write_bytes(b"not a key")  # sorts first: must not block the rest
    for name in ("hospital-b.supernode-0.pub", "nosite.pub", "Bad_Site.supernode-0.pub", "hospital-c.key.pem"):
        key = ec.generate_private_key(ec.SECP256R1())
        (superlink["sites"] / name).write_bytes(certificate("n", key).public_bytes(serialization.Encoding.PEM))
    wait("the site's key registered", lambda: len(nodes(superlink["admin"])) == before + 1, 30)
    # one more scan of the registrar (refusals are said once): the first to see a file put there now
    marker = superlink["sites"] / "zz-next-scan.pub"
    marker.write_bytes(b"not a key either")
    said = f"SuperNode key {marker.name} not registered"
    wait("another scan of the registrar", lambda: said in (superlink["work"] / "superlink.log").read_text())
    assert "hospital-b/supernode-0" in registered_names(superlink["admin"], monkeypatch)
    assert {"site-a/slot-0", "site-a/slot-1"} <= registered_names(superlink["admin"], monkeypatch)
    assert registrar.site_of_node("hospital-b/supernode-0") == "hospital-b"
    assert registrar.site_of_node("") == registrar.site_of_node("Bad_Site/x") == "unknown"
    log = (superlink["work"] / "superlink.log").read_text()
    assert "SuperNode key nosite.pub not registered: name it <site>.<key name>.pub" in log
    assert "SuperNode key Bad_Site.supernode-0.pub not registered" in log
    assert "SuperNode key hospital-c.key.pem not registered" in log  # not a .pub
    assert log.count("SuperNode key a-garbage.key.pub not registered: not an OpenSSH public key") == 1


def write_atomically(path: Path, data: bytes) -> None:
    """As a Secret volume changes: the registrar never reads half a file (hidden files it skips)."""
    hidden = path.with_name(f".{path.name}")
    hidden.write_bytes(data)
    hidden.rename(path)


def test_the_superlink_refuses_a_key_handed_in_twice_loudly(pki, superlink, monkeypatch):
    """Another site hands in site A's public key as its own: the SuperLink registers neither file,
    says which collide, counts it, and site A's node keeps its name (registered before the thief came)."""
    superlink["sites"].mkdir(exist_ok=True)
    stolen = (pki / "public" / "supernode-0.pub").read_bytes()  # site-a/slot-0's, from this release's keys
    write_atomically(superlink["sites"] / "hospital-x.slot-30.pub", stolen)
    key = ec.generate_private_key(ec.SECP256R1())
    write_atomically(
        superlink["sites"] / "hospital-z.slot-31.pub",
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    )
    wait(
        "a scan after the thief came",
        lambda: "hospital-z/slot-31" in registered_names(superlink["admin"], monkeypatch),
        30,
    )
    names = registered_names(superlink["admin"], monkeypatch)
    assert "hospital-x/slot-30" not in names and "site-a/slot-0" in names
    log = (superlink["work"] / "superlink.log").read_text()
    (said,) = [line for line in log.splitlines() if "same_key" in line]
    assert "supernode-0.pub" in said and "hospital-x.slot-30.pub" in said and "neither is registered" in said
    metrics = wait("the metrics", lambda: scrape(superlink["metrics_port"]), 10)
    assert value(metrics, "fedcifar_supernode_keys_refused_total", reason="same_key") == 1
    assert value(metrics, "fedcifar_supernode_keys_refused_total", reason="registered_as_other") == 0


def test_a_key_registered_under_another_name_is_said_not_taken_for_done(pki, superlink, tmp_path, monkeypatch, capsys):
    """Flower keeps a key's first name: registering site A's key 0 again as site-z/slot-5 is "already in
    use", which used to count as registered under the new name."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "supernode-0.pub").write_bytes((pki / "public" / "supernode-0.pub").read_bytes())
    before = refusals("registered_as_other")
    assert registrar.register_public_keys([registrar.KeyFolder(keys, "site-z", offset=5)], superlink["admin"]) == []
    (said,) = [line for line in capsys.readouterr().out.splitlines() if "supernode-0.pub" in line]
    assert "registered_as_other" in said and "site-a/slot-0" in said and "site-z/slot-5" in said
    assert refusals("registered_as_other") == before + 1
    assert "site-z/slot-5" not in registered_names(superlink["admin"], monkeypatch)
