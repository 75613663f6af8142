"""bench/peers/asyncio_peer.py -- Python's asyncio on bench/peers.lua's workloads.

  python3 bench/peers/asyncio_peer.py WORKLOAD

WORKLOAD: tasks, sleep, timers, threads or dag, as in bench/peers.lua (the
same sizes; the DAG from the same generator).  Prints one JSON object:
{"cold": ..., "warm": ...} (and "define_cold", "define_warm" for dag): the
first run in this process, and the best of the next WARM runs; microseconds
per unit, or seconds for all of the timers.
"""
import asyncio
import concurrent.futures
import json
import sys
import time

TASKS_N, SLEEP_N, THREAD_N, DAG_N, TIMER_N = 200000, 100000, 100000, 10000, 1000000
WARM = 2


async def noop():
    return 1


async def tasks():
    t0 = time.perf_counter()
    ts = [asyncio.create_task(noop()) for _ in range(TASKS_N)]
    for t in ts:
        await t
    return (time.perf_counter() - t0) * 1e6 / TASKS_N


async def sleeper():
    await asyncio.sleep(0.001)


async def sleep():
    t0 = time.perf_counter()
    ts = [asyncio.create_task(sleeper()) for _ in range(SLEEP_N)]
    for t in ts:
        await t
    return (time.perf_counter() - t0) * 1e6 / SLEEP_N


async def timers():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    fired = 0
    seed = 1

    def cb():
        nonlocal fired
        fired += 1
        if fired == TIMER_N:
            done.set_result(None)

    t0 = time.perf_counter()
    for _ in range(TIMER_N):
        seed = (seed * 1103515245 + 12345) % 2147483648
        loop.call_later(seed / 2147483648 * 0.1, cb)
    await done
    return time.perf_counter() - t0


def one():
    return 1


POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2)


async def threads():
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    fs = [loop.run_in_executor(POOL, one) for _ in range(THREAD_N)]
    for f in fs:
        await f
    return (time.perf_counter() - t0) * 1e6 / THREAD_N


def dag_define():
    """The DAG of bench/peers.lua and dag.js: layers of 100, each node after 1-3
    random nodes of the layer before (the same generator, so the same graph)."""
    seed = 3

    def random(k):
        nonlocal seed
        seed = (seed * 1103515245 + 12345) % 2147483648
        return 1 + seed % k

    nodes, width = [], 100
    for layer in range(DAG_N // width):
        for _ in range(width):
            deps = []
            if layer > 0:
                for _ in range(random(3)):
                    deps.append((layer - 1) * width + random(width) - 1)
            nodes.append((deps, one))
    return nodes


async def dag_run(nodes):
    done = [None] * len(nodes)

    async def node(deps, run):
        for d in deps:
            await done[d]
        return run()

    for i, (deps, run) in enumerate(nodes):
        done[i] = asyncio.create_task(node(deps, run))
    await asyncio.gather(*done)


async def dag():
    t0 = time.perf_counter()
    nodes = dag_define()
    t1 = time.perf_counter()
    await dag_run(nodes)
    t2 = time.perf_counter()
    return (t2 - t1) * 1e6 / DAG_N, (t1 - t0) * 1e6 / DAG_N


WORKLOADS = {"tasks": tasks, "sleep": sleep, "timers": timers, "threads": threads, "dag": dag}


def main():
    work = WORKLOADS[sys.argv[1]]
    loop = asyncio.new_event_loop()
    runs = [loop.run_until_complete(work()) for _ in range(1 + WARM)]
    loop.close()
    POOL.shutdown()
    if sys.argv[1] == "dag":
        out = {"cold": runs[0][0], "warm": min(r[0] for r in runs[1:]),
               "define_cold": runs[0][1], "define_warm": min(r[1] for r in runs[1:])}
    else:
        out = {"cold": runs[0], "warm": min(runs[1:])}
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    main()
