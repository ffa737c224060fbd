"""Which ranks this node starts, on which devices: the rank assignment of scripts/run_distribute_train.sh.

usage: python scripts/launch_plan.py msrun WORKER_NUM LOCAL_WORKER_NUM NODE_RANK MASTER_PORT CLUSTER_TIME_OUT
       python scripts/launch_plan.py ranktable RANK_TABLE_FILE [SERVER_ID]
msrun prints "RANK DEVICE" for each worker of this node; ranktable prints "RANK DEVICE SERVER_ID RANK_SIZE" for
each device of this server. A bad shape or table prints "error: ..." on stderr and exits 1. Stdlib only: the
script runs it before anything imports MindSpore.
"""

import ipaddress
import json
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

# msrun --master_port accepts 1024..65535 (msrun --help).
PORT_RANGE = range(1024, 65536)


class PlanError(ValueError):
    """A cluster shape or rank table that cannot be launched; the message says what to fix."""


@dataclass(frozen=True)
class Device:
    """A device of a rank table: its global rank (RANK_ID) and its device_id on its server (DEVICE_ID)."""

    rank: int
    device: int


@dataclass(frozen=True)
class Server:
    """A server_list entry: the server_id a host is matched against, and its devices."""

    server_id: str
    devices: tuple[Device, ...]


@dataclass(frozen=True)
class RankTable:
    """A checked rank table; rank_size is RANK_SIZE, the devices of all servers."""

    path: str
    servers: tuple[Server, ...]

    @property
    def rank_size(self) -> int:
        return sum(len(server.devices) for server in self.servers)


def parse_int(name: str, text: str, minimum: Literal[0, 1] | None = None) -> int:
    """`text` as a decimal integer (>= `minimum`), or a PlanError naming the variable."""
    if not re.fullmatch(r"-?[0-9]+", text) or (minimum is not None and int(text) < minimum):
        kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}[minimum]
        raise PlanError(f"{name} must be {kind}, got {text!r}")
    return int(text)


def msrun_ranks(worker_num: int, local_worker_num: int, node_rank: int) -> list[tuple[int, int]]:
    """(global rank, local device) of this node's workers.

    msrun gives worker i of node NODE_RANK the rank NODE_RANK * LOCAL_WORKER_NUM + i and DEVICE_ID i (MindSpore
    msrun docs, --node_rank), which is right only when every node starts LOCAL_WORKER_NUM workers.
    """
    if local_worker_num > worker_num:
        raise PlanError(f"LOCAL_WORKER_NUM ({local_worker_num}) is larger than WORKER_NUM ({worker_num}), "
                        "the total over all nodes")
    if worker_num % local_worker_num:
        raise PlanError(f"WORKER_NUM ({worker_num}) is not a multiple of LOCAL_WORKER_NUM ({local_worker_num}): "
                        "every node must start LOCAL_WORKER_NUM workers")
    nodes = worker_num // local_worker_num
    if node_rank >= nodes:
        raise PlanError(f"NODE_RANK ({node_rank}) must be below WORKER_NUM / LOCAL_WORKER_NUM = {nodes}, "
                        "the number of nodes")
    first = node_rank * local_worker_num
    return [(first + i, i) for i in range(local_worker_num)]


def _table_int(value: object, where: str) -> int:
    """A rank table number: v1.0 tables write them as strings ("0"), some tools as JSON numbers."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PlanError(f"{where} must be a non-negative integer, got {value!r}")
    return parse_int(where, str(value), 0)


def _require(entry: object, key: str, where: str) -> object:
    if not isinstance(entry, dict) or key not in entry:
        raise PlanError(f"{where} has no {key!r}")
    return entry[key]


def load_rank_table(path: str) -> RankTable:
    """Read and check a v1.0 HCCL rank table: unique server_ids and device_ids, rank_ids exactly 0..N-1."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise PlanError(f"cannot read the rank table {path}: {err}") from err
    server_list = _require(data, "server_list", f"rank table {path}")
    if not isinstance(server_list, list) or not server_list:
        raise PlanError(f"rank table {path}: server_list must be a non-empty list")
    if "server_count" in data and _table_int(data["server_count"], "server_count") != len(server_list):
        raise PlanError(f"rank table {path}: server_count is {data['server_count']} but server_list has "
                        f"{len(server_list)} entries")
    servers = []
    for index, entry in enumerate(server_list):
        where = f"rank table {path}: server_list[{index}]"
        server_id = _require(entry, "server_id", where)
        if not isinstance(server_id, str) or not server_id or server_id.split() != [server_id]:
            raise PlanError(f"{where}.server_id must be a host name or address, got {server_id!r}")
        device_list = _require(entry, "device", where)
        if not isinstance(device_list, list) or not device_list:
            raise PlanError(f"{where}.device must be a non-empty list")
        devices = []
        for d, device in enumerate(device_list):
            at = f"{where}.device[{d}]"
            _require(device, "device_ip", at)  # HCCL connects the devices through it
            devices.append(Device(rank=_table_int(_require(device, "rank_id", at), f"{at}.rank_id"),
                                  device=_table_int(_require(device, "device_id", at), f"{at}.device_id")))
        ids = [device.device for device in devices]
        if len(set(ids)) != len(ids):
            raise PlanError(f"{where} (server {server_id}) lists a device_id twice: {ids}")
        servers.append(Server(server_id, tuple(devices)))
    names = [server.server_id for server in servers]
    if len(set(names)) != len(names):
        raise PlanError(f"rank table {path}: a server_id appears twice: {names}")
    ranks = sorted(device.rank for server in servers for device in server.devices)
    duplicates = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    if duplicates:
        raise PlanError(f"rank table {path}: duplicate rank_id {', '.join(map(str, duplicates))}")
    if ranks != list(range(len(ranks))):
        raise PlanError(f"rank table {path}: rank_ids must be 0..{len(ranks) - 1}, got {ranks}")
    return RankTable(path, tuple(servers))


def _interface_addresses() -> list[str]:
    """This host's interface addresses from `ip -j addr`, as msrun finds its own (msrun docs, --master_addr)."""
    try:
        out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10, check=True).stdout
        return [addr["local"] for link in json.loads(out) for addr in link.get("addr_info", []) if "local" in addr]
    except (OSError, subprocess.SubprocessError, ValueError, TypeError, AttributeError):
        return []


def host_names() -> list[str]:
    """This host's names and addresses: hostname, FQDN, what they resolve to, interface and loopback addresses."""
    hostname = socket.gethostname()
    names = [hostname, socket.getfqdn(), "127.0.0.1", "::1"]
    try:
        name, aliases, addresses = socket.gethostbyname_ex(hostname)
        names += [name, *aliases, *addresses]
    except OSError:
        pass
    names += _interface_addresses()
    return list(dict.fromkeys(names))


def _same_host(server_id: str, names: list[str]) -> bool:
    """server_id names one of `names`: equal addresses (any spelling) or equal host names (any case)."""
    try:
        address = ipaddress.ip_address(server_id)
    except ValueError:
        return server_id.lower() in (name.lower() for name in names)
    for name in names:
        try:
            if ipaddress.ip_address(name.split("%")[0]) == address:
                return True
        except ValueError:
            continue
    return False


def select_server(table: RankTable, server_id: str | None, names: list[str] | None = None) -> Server:
    """The table's entry for this server.

    `server_id` (the SERVER_ID variable) is a server_id of the table or, failing that, a 0-based index into
    server_list; without it, the one entry whose server_id is this host's name or one of its addresses.
    """
    ids = ", ".join(server.server_id for server in table.servers)
    if server_id:
        for server in table.servers:
            if server.server_id == server_id:
                return server
        if re.fullmatch(r"[0-9]+", server_id) and int(server_id) < len(table.servers):
            return table.servers[int(server_id)]
        raise PlanError(f"SERVER_ID {server_id!r} is neither a server_id of {table.path} ({ids}) nor an index "
                        f"0..{len(table.servers) - 1} into its server_list")
    names = host_names() if names is None else names
    found = [server for server in table.servers if _same_host(server.server_id, names)]
    if len(found) == 1:
        return found[0]
    if found:
        raise PlanError(f"this host matches several servers of {table.path} "
                        f"({', '.join(s.server_id for s in found)}); set SERVER_ID to pick one")
    raise PlanError(f"this host ({', '.join(names)}) is not in the rank table {table.path} (server_ids: {ids}); "
                    "run on a server of the table or set SERVER_ID to a server_id or a 0-based index")


def main(argv: list[str] | None = None) -> int:
    """The CLI of the module docstring: print this node's plan, or an error and exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 6 and argv[0] == "msrun":
            worker_num = parse_int("WORKER_NUM", argv[1], 1)
            local_worker_num = parse_int("LOCAL_WORKER_NUM", argv[2], 1)
            node_rank = parse_int("NODE_RANK", argv[3], 0)
            if parse_int("MASTER_PORT", argv[4]) not in PORT_RANGE:
                raise PlanError(f"MASTER_PORT must be in {PORT_RANGE.start}..{PORT_RANGE.stop - 1}, got {argv[4]}")
            parse_int("CLUSTER_TIME_OUT", argv[5])  # msrun: a negative value waits forever
            for rank, device in msrun_ranks(worker_num, local_worker_num, node_rank):
                print(rank, device)
            return 0
        if len(argv) in (2, 3) and argv[0] == "ranktable":
            table = load_rank_table(argv[1])
            server = select_server(table, argv[2] if len(argv) == 3 else None)
            for device in server.devices:
                print(device.rank, device.device, server.server_id, table.rank_size)
            return 0
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(__doc__.splitlines()[2:4]), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
