"""scripts/run_distribute_train.sh as clusters run it: dry runs of both launch paths, and two msrun nodes on CPU."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

from scripts.launch_plan import PlanError, RankTable, load_rank_table, select_server
from tests.helpers import make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
SCRIPT = "scripts/run_distribute_train.sh"
# The launch settings a caller's environment may hold: every test sets its own.
LAUNCH_VARS = ("WORKER_NUM", "LOCAL_WORKER_NUM", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CLUSTER_TIME_OUT",
               "SERVER_ID", "DRY_RUN", "RANK_TABLE_FILE", "RANK_SIZE", "RANK_ID", "DEVICE_ID")
# As in tests/test_train.py: a tiny deterministic recipe, and the msrun_weights fixture's arguments.
QUIET = ["--progress", "false", "--num_parallel_workers", "1", "--auto_augment", "null", "--re_prob", "0",
         "--mixup", "0", "--cutmix", "0", "--drop_path_rate", "0", "--device_target", "CPU", "--cooldown_epochs", "0",
         "--warmup_epochs", "0"]
COMMON = ["--model", "dvt_tiny_deit", "--dataset", "folder", "--num_classes", "3", "--img_size", "16",
          "--epochs", "1", "--warmup_epochs", "0", "--max_steps_per_epoch", "3", "--shuffle", "false",
          "--ema", "false", "--label_smoothing", "0.1", "--lr", "0.01", "--hflip", "0", "--scale", "[1, 1]",
          "--ratio", "[1, 1]",  # deterministic crops: each rank must see exactly its half of the batch
          "--eval_interval", "0",  # the weights are compared, not validation
          "--eps", "1e-6"]  # see msrun_weights in tests/test_train.py
CKPT = "dvt_tiny_deit-e0001.ckpt"
NOT_THIS_HOST = ("node-a.invalid", "node-b.invalid")  # .invalid names never belong to a host (RFC 2606)


def launch_env(**settings: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, **settings}


def launch(*args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=launch_env(**settings), capture_output=True,
                          text=True, timeout=120)


def write_table(path, server_ids, rank_ids=None) -> str:
    """A v1.0 HCCL rank table: two devices per server, rank_ids 0..N-1 in order unless given."""
    rank_ids = rank_ids or list(range(2 * len(server_ids)))
    servers = [{"server_id": server_id, "host_nic_ip": "reserve",
                "device": [{"device_id": str(d), "device_ip": f"192.168.{s}.{d}", "rank_id": str(rank_ids[2 * s + d])}
                           for d in range(2)]}
               for s, server_id in enumerate(server_ids)]
    path.write_text(json.dumps({"version": "1.0", "server_count": str(len(server_ids)), "server_list": servers,
                                "status": "completed"}))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_folder(tmp_path_factory.mktemp("folder"), per_class=16, size=(24, 24), modes=("RGB", "L"))


def test_usage_prints_the_whole_header():
    with open(os.path.join(ROOT, SCRIPT)) as handle:
        lines = handle.read().splitlines()
    header = [line[2:] for line in lines[1:lines.index("set -euo pipefail")]]
    usage = launch()
    assert usage.returncode == 1 and usage.stderr.splitlines() == header


def test_rank_table_dry_run_starts_the_chosen_servers_ranks(data, tmp_path):
    table = write_table(tmp_path / "rank_table_4p.json", ["10.0.0.1", "10.0.0.2"])
    out = tmp_path / "run"
    for server_id in ("10.0.0.2", "1"):  # a server_id, or an index into server_list
        plan = launch(table, data, "config/demo.yaml", "--dry_run", "--output_dir", str(out), SERVER_ID=server_id)
        assert plan.returncode == 0, plan.stderr
        lines = plan.stdout.splitlines()
        assert lines[0] == f"rank table {table}: server 10.0.0.2, 2 of 4 ranks"
        assert lines[1:3] == [f"rank 2 device 0 server 10.0.0.2 log {out}/logs/worker_2.log",
                              f"rank 3 device 1 server 10.0.0.2 log {out}/logs/worker_3.log"]
        assert lines[3].startswith(f"command: RANK_TABLE_FILE={table} RANK_SIZE=4 RANK_ID=<rank> DEVICE_ID=<device> "
                                   "python train.py --config_path ")
        assert "--distribute true --device_target Ascend" in lines[3]
    plan = launch(table, data, "config/demo.yaml", "--output_dir", str(out), SERVER_ID="0", DRY_RUN="1")
    assert plan.returncode == 0 and "rank 1 device 1 server 10.0.0.1 log" in plan.stdout
    assert not out.exists()  # a dry run creates nothing


def test_rank_table_matches_this_host_without_server_id(data, tmp_path):
    for this_host in ("127.0.0.1", socket.gethostname()):
        table = write_table(tmp_path / "table.json", [NOT_THIS_HOST[0], this_host])
        plan = launch(table, data, "config/demo.yaml", "--dry_run")
        assert plan.returncode == 0, plan.stderr
        assert [line.split()[:6] for line in plan.stdout.splitlines()[1:3]] == [
            ["rank", "2", "device", "0", "server", this_host], ["rank", "3", "device", "1", "server", this_host]]


def test_rank_table_errors_are_clear(data, tmp_path):
    table = write_table(tmp_path / "elsewhere.json", list(NOT_THIS_HOST))
    failed = launch(table, data, "config/demo.yaml", "--dry_run")
    assert failed.returncode == 1 and failed.stdout == ""
    assert f"error: this host ({socket.gethostname()}, " in failed.stderr
    assert "127.0.0.1" in failed.stderr and "(server_ids: node-a.invalid, node-b.invalid)" in failed.stderr
    failed = launch(table, data, "config/demo.yaml", "--dry_run", SERVER_ID="2")
    assert failed.returncode == 1 and "error: SERVER_ID '2' is neither a server_id" in failed.stderr
    table = write_table(tmp_path / "duplicate.json", ["10.0.0.1", "10.0.0.2"], rank_ids=[0, 1, 2, 2])
    failed = launch(table, data, "config/demo.yaml", "--dry_run", SERVER_ID="0")
    assert failed.returncode == 1 and f"error: rank table {table}: duplicate rank_id 2" in failed.stderr
    failed = launch(str(tmp_path / "none.json"), data, "config/demo.yaml", "--dry_run")
    assert failed.returncode == 1 and "error: RANK_TABLE_FILE not found" in failed.stderr


def test_rank_table_checks(tmp_path):
    def table_error(edit) -> str:
        path = tmp_path / "table.json"
        table = json.loads(open(write_table(path, ["10.0.0.1", "10.0.0.2"])).read())
        edit(table)
        path.write_text(json.dumps(table))
        with pytest.raises(PlanError) as err:
            load_rank_table(str(path))
        return str(err.value)

    assert "rank_ids must be 0..3, got [0, 1, 2, 4]" in table_error(
        lambda t: t["server_list"][1]["device"][1].update(rank_id="4"))
    assert "server_list[1].device[0] has no 'device_ip'" in table_error(
        lambda t: t["server_list"][1]["device"][0].pop("device_ip"))
    assert "server_list[0] has no 'server_id'" in table_error(lambda t: t["server_list"][0].pop("server_id"))
    assert "a server_id appears twice" in table_error(lambda t: t["server_list"][1].update(server_id="10.0.0.1"))
    assert "server_count is 3" in table_error(lambda t: t.update(server_count="3"))
    table = load_rank_table(write_table(tmp_path / "ok.json", ["fd00::1", "host-b"]))
    assert isinstance(table, RankTable) and table.rank_size == 4
    # Addresses compare as addresses (any spelling), host names case-insensitively.
    assert select_server(table, None, ["fd00:0:0::1", "127.0.0.1"]).server_id == "fd00::1"
    assert select_server(table, None, ["HOST-B", "127.0.0.1"]).server_id == "host-b"
    with pytest.raises(PlanError, match="several servers"):
        select_server(table, None, ["fd00::1", "host-b"])


def test_msrun_dry_run_prints_this_nodes_ranks_and_command(data, tmp_path):
    out = tmp_path / "run"
    plan = launch("4", data, "config/demo.yaml", "CPU", "--dry_run", "--output_dir", str(out),
                  NODE_RANK="1", LOCAL_WORKER_NUM="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[:3] == ["msrun node 1 of 2, scheduler 10.0.0.1:29500: 2 of 4 workers",
                         f"rank 2 device 0 log {out}/logs/worker_2.log", f"rank 3 device 1 log {out}/logs/worker_3.log"]
    assert lines[3] == (f"command: msrun --worker_num=4 --local_worker_num=2 --master_addr=10.0.0.1 "
                        f"--master_port=29500 --node_rank=1 --cluster_time_out=600 --log_dir={out}/logs --join=True "
                        f"train.py --config_path {ROOT}/config/demo.yaml --data_path {data} --distribute true "
                        f"--device_target CPU --output_dir {out}")
    assert not out.exists()
    one_node = launch("2", data, "config/demo.yaml", "--output_dir", str(out), DRY_RUN="1")
    assert one_node.returncode == 0 and one_node.stdout.splitlines()[:3] == [
        "msrun node 0 of 1, scheduler 127.0.0.1:8118: 2 of 2 workers",
        f"rank 0 device 0 log {out}/logs/worker_0.log", f"rank 1 device 1 log {out}/logs/worker_1.log"]


@pytest.mark.parametrize("settings, message", [
    ({"LOCAL_WORKER_NUM": "8"}, "LOCAL_WORKER_NUM (8) is larger than WORKER_NUM (4)"),
    ({"LOCAL_WORKER_NUM": "2", "NODE_RANK": "2"}, "NODE_RANK (2) must be below WORKER_NUM / LOCAL_WORKER_NUM = 2"),
    ({"NODE_RANK": "1"}, "NODE_RANK (1) must be below WORKER_NUM / LOCAL_WORKER_NUM = 1"),
    ({"LOCAL_WORKER_NUM": "3"}, "WORKER_NUM (4) is not a multiple of LOCAL_WORKER_NUM (3)"),
    ({"LOCAL_WORKER_NUM": "two"}, "LOCAL_WORKER_NUM must be a positive integer, got 'two'"),
    ({"NODE_RANK": "-1"}, "NODE_RANK must be a non-negative integer, got '-1'"),
    ({"MASTER_PORT": "80"}, "MASTER_PORT must be in 1024..65535, got 80"),
    ({"DRY_RUN": "yes"}, "DRY_RUN must be 0 or 1, got 'yes'"),
])
def test_msrun_bad_shapes_fail_clearly(data, settings, message):
    failed = launch("4", data, "config/demo.yaml", "--dry_run", **settings)
    assert failed.returncode == 1 and failed.stdout == ""
    assert f"error: {message}" in failed.stderr


def test_dry_run_still_checks_paths_and_config(data, tmp_path):
    failed = launch("2", str(tmp_path / "none"), "config/demo.yaml", "--dry_run")
    assert failed.returncode == 1 and "error: dataset path not found" in failed.stderr
    failed = launch("2", data, "config/nope.yaml", "--dry_run")
    assert failed.returncode == 1 and "error: config file not found" in failed.stderr
    failed = launch("2", data, "config/demo.yaml", "--dry_run", "--no_such_key", "1")
    assert failed.returncode == 1 and "unknown config key 'no_such_key'" in failed.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """A process listens on IPv4 TCP `port` (/proc/net/tcp: state 0A), found without connecting to it."""
    with open("/proc/net/tcp") as handle:
        rows = [line.split() for line in handle.readlines()[1:]]
    return any(row[3] == "0A" and int(row[1].split(":")[1], 16) == port for row in rows)


def start_node(node_rank: int, port: int, data: str, out: str, console: str) -> subprocess.Popen:
    """One msrun node of a 2-node x 1-worker cluster; all nodes share `out`, as on a shared filesystem."""
    with open(console, "w") as handle:
        return subprocess.Popen(
            ["bash", SCRIPT, "2", data, "config/demo.yaml", "CPU", *QUIET, *COMMON, "--batch_size", "4",
             "--ckpt_all_ranks", "true", "--output_dir", out], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
            env=launch_env(LOCAL_WORKER_NUM="1", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), CLUSTER_TIME_OUT="300"))


def wait_all(processes: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; on a timeout or an error, stop the rest as Ctrl+C would (msrun stops its workers)."""
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def tails(*paths: str) -> str:
    return "".join(f"--- {p}\n{open(p).read()[-2000:]}" for p in paths if os.path.exists(p))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """Two msrun nodes of one worker each; one node of two workers; one process on the global batch of 8."""
    tmp = str(tmp_path_factory.mktemp("runs"))
    single, one_node, two_nodes = (os.path.join(tmp, name) for name in ("single", "one_node", "two_nodes"))
    result = subprocess.run([PYTHON, "train.py", *QUIET, "--config_path", "config/demo.yaml", *COMMON,
                             "--data_path", data, "--batch_size", "8", "--output_dir", single],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = subprocess.run(["bash", SCRIPT, "2", data, "config/demo.yaml", "CPU", *QUIET, *COMMON,
                             "--batch_size", "4", "--output_dir", one_node], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=launch_env(MASTER_PORT=str(free_port())))
    assert result.returncode == 0, tails(*glob.glob(os.path.join(one_node, "logs", "*.log"))) + result.stderr
    port = free_port()
    consoles = [os.path.join(tmp, f"node_{n}.out") for n in (0, 1)]
    nodes = [start_node(0, port, data, two_nodes, consoles[0])]
    try:
        # msrun starts its scheduler on every node that has MASTER_ADDR (MindSpore msrun docs, --master_addr), here
        # on both: start node 1 once node 0's scheduler listens, so that node 0's is the one that binds the port.
        deadline = time.monotonic() + 300
        while not listening(port):
            assert nodes[0].poll() is None and time.monotonic() < deadline, tails(consoles[0])
            time.sleep(0.2)
        nodes.append(start_node(1, port, data, two_nodes, consoles[1]))
    finally:
        wait_all(nodes, timeout=600)
    logs = [os.path.join(two_nodes, "logs", f"worker_{rank}.log") for rank in (0, 1)]
    assert nodes[0].returncode == 0, tails(consoles[0], *logs)
    weights = {name: ms.load_checkpoint(os.path.join(path, CKPT)) for name, path in (
        ("rank0", two_nodes), ("rank1", os.path.join(two_nodes, "rank_1")), ("one_node", one_node),
        ("single", single))}
    return {"weights": weights, "dir": two_nodes, "returncodes": [n.returncode for n in nodes],
            "consoles": [open(c).read() for c in consoles]}


def model_parameter_names(weights: dict) -> list[str]:
    names = [n for n in weights if n.startswith("stages.")]
    assert names
    return names


def test_two_nodes_end_with_identical_weights(runs):
    rank0, rank1 = runs["weights"]["rank0"], runs["weights"]["rank1"]
    for n in model_parameter_names(rank0):
        np.testing.assert_array_equal(rank0[n].asnumpy(), rank1[n].asnumpy(), err_msg=n)
    assert int(rank0["global_step"].asnumpy().reshape(-1)[0]) == 3


def test_two_nodes_equal_one_node_and_one_process(runs):
    rank0 = runs["weights"]["rank0"]
    for other in ("one_node", "single"):
        for n in model_parameter_names(rank0):
            np.testing.assert_allclose(rank0[n].asnumpy(), runs["weights"][other][n].asnumpy(), atol=1e-5,
                                       err_msg=f"{other}: {n}")


def test_two_nodes_share_one_run_directory_with_a_log_per_rank(runs):
    run_dir = runs["dir"]
    assert {"config.yaml", "metrics.jsonl", CKPT} <= set(os.listdir(run_dir))  # rank 0 writes the run
    assert not {"config.yaml", "metrics.jsonl"} & set(os.listdir(os.path.join(run_dir, "rank_1")))
    logs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "logs", "worker_*.log")))
    assert logs == ["worker_0.log", "worker_1.log"]  # named by global rank
    with open(os.path.join(run_dir, "logs", "worker_1.log")) as handle:
        assert "[rank 1] " in handle.read()
    with open(os.path.join(run_dir, "logs", "worker_0.log")) as handle:
        assert "[rank 1] " not in handle.read()
    # Node 1's own scheduler (see the fixture) finds the port taken and fails, so its msrun exits 1 once its
    # worker is done; its worker itself succeeded.
    assert runs["returncodes"] == [0, 1]
    assert "Scheduler process" in runs["consoles"][1] and "Worker process" not in runs["consoles"][1]
