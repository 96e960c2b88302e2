"""End to end: fan-out over real agents and fan-in by a merge command.

Each shard counts the words of its slice of a file the test writes (every
SCHEDULER_SHARD_COUNT-th line from SCHEDULER_SHARD_INDEX); the merge sums
what the shards printed (its stdin) and checks it against the per-shard
files in SCHEDULER_SHARD_OUTPUTS. The test counts the words itself.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap

import pytest
import requests

from tests.harness import wait_for

pytestmark = pytest.mark.e2e

SHARD = textwrap.dedent(
    """
    import os, pathlib, sys
    index = int(os.environ["SCHEDULER_SHARD_INDEX"])
    count = int(os.environ["SCHEDULER_SHARD_COUNT"])
    assert int(os.environ["SCHEDULER_RUN_ID"]) > 0
    words, fail = sys.argv[1], sys.argv[2]
    if fail.startswith("once:"):
        # Fails the first time this shard runs: the marker says it did.
        _, marker, bad = fail.split(":")
        marker = pathlib.Path(marker)
        if index == int(bad) and not marker.exists():
            marker.write_text("failed once")
            sys.exit(1)
    if fail.startswith("always:") and index == int(fail.split(":")[1]):
        sys.exit(1)
    lines = pathlib.Path(words).read_text().splitlines()[index::count]
    print(sum(len(line.split()) for line in lines))
    """
)

MERGE = textwrap.dedent(
    """
    import os, sys
    total = sum(int(n) for n in sys.stdin.read().split())
    outputs = os.environ["SCHEDULER_SHARD_OUTPUTS"]
    count = int(os.environ["SCHEDULER_SHARD_COUNT"])
    names = sorted(os.listdir(outputs), key=int)
    assert names == [str(i) for i in range(count)], names
    apart = sum(int(open(os.path.join(outputs, n)).read()) for n in names)
    assert apart == total, (apart, total)
    print(total)
    """
)


@pytest.fixture
def word_count(tmp_path):
    """(shard script, merge script, words file, the file's word count)."""
    rng = random.Random(8)
    lines = [
        " ".join(rng.choice(["alpha", "beta", "gamma", "δέλτα"]) for _ in range(rng.randint(0, 9)))
        for _ in range(500)
    ]
    words = tmp_path / "words.txt"
    words.write_text("\n".join(lines) + "\n")
    shard, merge = tmp_path / "shard.py", tmp_path / "merge.py"
    shard.write_text(SHARD)
    merge.write_text(MERGE)
    return shard, merge, words, sum(len(line.split()) for line in lines)


def _task(master, name, word_count, *, shards, fail="none", max_retries=0):
    shard, merge, words, _ = word_count
    return master.create_task(
        name=name,
        command=f"{sys.executable} {shard} {words} {fail}",
        merge_command=f"{sys.executable} {merge}",
        shards=shards,
        max_retries=max_retries,
        retry_backoff_s=0,
    )


def _agents(start_agent):
    """Three real agents of one slot each: six shards cannot all go to one."""
    return [start_agent(f"agent-{n}", capacity=1) for n in (1, 2, 3)]


def test_a_sharded_word_count_is_merged_into_the_count(master, start_agent, word_count, tmp_path):
    agents = _agents(start_agent)
    task = _task(master, "wc", word_count, shards=6)

    run = master.wait_final(master.trigger(task["id"])["id"], timeout=60)

    assert run["status"] == "succeeded", run
    expected = f"{word_count[3]}\n"
    assert run["result"] == expected
    assert run["result_truncated"] is False
    assert [s["index"] for s in run["shards"]] == list(range(6))
    assert {s["status"] for s in run["shards"]} == {"succeeded"}
    assert len({s["worker"] for s in run["shards"]}) > 1, run["shards"]
    assert run["merge"]["status"] == "succeeded"
    # The download is the same text.
    download = master.api("GET", f"runs/{run['id']}/result")
    assert download.status_code == 200
    assert download.headers["Content-Type"].startswith("text/plain")
    assert download.text == expected
    # The merge's inputs are gone from the agent that ran it.
    for agent in agents:
        merge_dir = agent.state_dir / "merge"
        assert not merge_dir.exists() or not any(merge_dir.iterdir()), agent.name


def test_a_shard_that_fails_once_is_retried_alone(master, start_agent, word_count, tmp_path):
    _agents(start_agent)
    marker = tmp_path / "failed-once"
    task = _task(master, "wc-flaky", word_count, shards=4, fail=f"once:{marker}:2", max_retries=2)

    run = master.wait_final(master.trigger(task["id"])["id"], timeout=60)

    assert run["status"] == "succeeded", run
    assert marker.exists()
    assert run["result"] == f"{word_count[3]}\n"
    assert [s["attempts"] for s in run["shards"]] == [1, 1, 2, 1]
    tries = sorted((a["shard_index"], a["try_number"], a["status"]) for a in run["attempts"])
    assert tries == [
        (0, 1, "succeeded"),
        (1, 1, "succeeded"),
        (2, 1, "failed"),
        (2, 2, "succeeded"),
        (3, 1, "succeeded"),
        (4, 1, "succeeded"),  # the merge
    ]


def test_a_shard_that_always_fails_fails_the_run_without_a_merge(
    master, start_agent, word_count, tmp_path
):
    _agents(start_agent)
    task = _task(master, "wc-broken", word_count, shards=4, fail="always:1", max_retries=1)

    run = master.wait_final(master.trigger(task["id"])["id"], timeout=60)

    assert run["status"] == "failed", run
    assert run["reason"] == "shard 1 of 4 failed: exit code 1 (after 2 attempts)"
    assert run["merge"] == {"index": 4, "status": None, "worker": None, "attempts": 0}
    assert all(a["shard_index"] < 4 for a in run["attempts"])
    assert run["result"] is None
    assert master.api("GET", f"runs/{run['id']}/result").status_code == 409


def test_the_shard_outputs_are_served_only_to_the_worker_holding_the_merge(
    master, start_agent, word_count, tmp_path
):
    agents = {agent.name: agent for agent in _agents(start_agent)}
    shard, _, words, _ = word_count
    # A merge that waits, so that its attempt stays running while we ask.
    task = master.create_task(
        name="wc-slow-merge",
        command=f"{sys.executable} {shard} {words} none",
        merge_command="sleep 30",
        shards=2,
    )
    run_id = master.trigger(task["id"])["id"]

    def merge_running():
        run = master.run_of(run_id)
        return run["merge"] and run["merge"]["status"] == "running" and run

    run = wait_for(merge_running, timeout=30, what="the merge running")
    [merge] = [a for a in run["attempts"] if a["shard_index"] == 2]
    attempts = master.api("GET", f"runs/{run_id}?shard=0").json()["attempts"]
    [shard0] = [a for a in attempts if a["shard_index"] == 0]
    url = f"{master.url}/api/agent/attempts/{merge['id']}/shards/0"

    def ask(credential: str) -> requests.Response:
        return requests.get(url, headers={"Authorization": f"Bearer {credential}"}, timeout=10)

    holder = _credential(agents.pop(merge["worker"]))
    served = ask(holder)
    assert served.status_code == 200, served.text
    assert served.text == shard0["stdout"]
    # Another worker's credential: 403; an API token is no worker's: 401.
    other = ask(_credential(next(iter(agents.values()))))
    assert other.status_code == 403, other.text
    assert other.json()["error"].startswith("worker agent-")
    assert "does not hold merge attempt" in other.json()["error"]
    assert ask(master.token).status_code == 401
    # A shard index the run does not have: 403 as well, even for the holder.
    bad = requests.get(
        url[: -len("0")] + "2", headers={"Authorization": f"Bearer {holder}"}, timeout=10
    )
    assert bad.status_code == 403
    master.api("POST", f"runs/{run_id}/cancel")


def _credential(agent) -> str:
    return json.loads((agent.state_dir / "credential.json").read_text())["credential"]
