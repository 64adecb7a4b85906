#!/usr/bin/env python3
"""bench/peer_asyncio.py -- the reference peer: the seeds' design, a Python asyncio worker.

What jobloop replaces (DESIGN.md: "a Python asyncio worker pool beside the database"),
built the usual way and tuned fairly, so that bench/run.sh can measure both on the same
machine, in the same run, against the same mock API:

  * jobs live in a plain table of their own (peer_job, made by bench/run.sh), not
    jobloop's; a submit is an INSERT of N rows (plus a NOTIFY) in one statement;
  * each process claims pending jobs with UPDATE ... FOR UPDATE SKIP LOCKED, at most
    --claim rows per statement (500: two processes share a burst, as jobloop's two
    workers do with 1,000 / jobloop.workers), woken by LISTEN peer_job (and a poll
    every second as a fallback);
  * one asyncio task per job loops  request(state) -> HTTP GET -> step(state, response)
    -> UPDATE of the row, committed (autocommit: one commit per step) -> ...  until
    done(state); the business logic is bench/kind.sql's, in Python: GET url || n, n + 1,
    stop at n >= k or once the clock passes "until";
  * one aiohttp ClientSession per process with an unlimited keep-alive connection pool
    (a connection per call in flight, kept 300 s like the mock's keepalive_timeout), and
    one asyncpg pool (--pool connections, 8 by default: on 2 cores more
    backends only contend for the CPU) for the claims and state updates;
  * transport errors and 5xx are retried up to 3 attempts (jobloop's max_attempts in the
    bench kind), with an Idempotency-Key: peer-<job id>-<step> (the mock's access log
    gives bench/run.sh the same per-request timeline as for jobloop);
  * every state update is fenced on the worker that claimed the job.

bench/run.sh starts two of these processes (--worker 1, --worker 2) once and keeps them
running across the matrix, as jobloop's workers are, so both keep their connections
between cells.  Run by hand:

  python3 bench/peer_asyncio.py --dsn 'host=127.0.0.1 port=5432 dbname=peer user=postgres' --worker 1

It prints "ready" once connected, then runs until SIGTERM or SIGINT.
Needs python3-aiohttp and python3-asyncpg (Debian packages).
"""

import argparse
import asyncio
import json
import signal
import sys
import time

import aiohttp
import asyncpg

CLAIM = """
UPDATE peer_job j SET status = 'running', worker = $1, started_at = now(), updated_at = now()
  FROM (SELECT id FROM peer_job WHERE status = 'pending' ORDER BY id
         LIMIT $2 FOR UPDATE SKIP LOCKED) c
 WHERE j.id = c.id
RETURNING j.id, j.state
"""

STEP = """
UPDATE peer_job SET state = $2, step = $3, updated_at = now()
 WHERE id = $1 AND worker = $4
"""

FINISH = """
UPDATE peer_job SET state = $2, step = $3, status = $5, last_error = $6,
       finished_at = now(), updated_at = now()
 WHERE id = $1 AND worker = $4
"""

MAX_ATTEMPTS = 3


# The business logic: bench/kind.sql's request, step and done.
def request(state):
    return state["url"] + str(state["n"])


def step(state, status, body):
    if status != 200:
        raise RuntimeError(f"HTTP {status}")
    json.loads(body)            # jobloop turns every response body into jsonb; so do we
    state = dict(state)
    state["n"] = state["n"] + 1
    return state


def done(state):
    return state["n"] >= state["k"] or time.time() >= state["until"]


class Peer:
    def __init__(self, args):
        self.args = args
        self.tasks = set()
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.steps = 0
        self.full = False           # the last claim was cut short by max_in_flight

    async def init_conn(self, conn):
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")

    async def run_job(self, job_id, state):
        worker = self.args.worker
        try:
            while True:
                url = request(state)
                headers = {"Idempotency-Key": f"peer-{job_id}-{state['n']}"}
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    try:
                        async with self.session.get(url, headers=headers) as resp:
                            body = await resp.read()
                            status = resp.status
                        if status < 500 or attempt == MAX_ATTEMPTS:
                            break
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        if attempt == MAX_ATTEMPTS:
                            raise
                    await asyncio.sleep(0.1 * 2 ** (attempt - 1))
                state = step(state, status, body)
                self.steps += 1
                if done(state):
                    await self.pool.execute(FINISH, job_id, state, state["n"], worker,
                                            "completed", None)
                    return
                await self.pool.execute(STEP, job_id, state, state["n"], worker)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the job fails, the worker goes on
            try:
                await self.pool.execute(FINISH, job_id, state, state["n"], worker,
                                        "failed", repr(e)[:500])
            except Exception as e2:
                print(f"job {job_id}: could not record failure: {e2!r}", file=sys.stderr)

    async def claimer(self):
        args = self.args
        while not self.stopping.is_set():
            free = args.max_in_flight - len(self.tasks)
            rows = []
            if free > 0:
                rows = await self.pool.fetch(CLAIM, args.worker, min(free, args.claim))
                self.full = len(rows) == free
                for r in rows:
                    t = asyncio.create_task(self.run_job(r["id"], r["state"]))
                    self.tasks.add(t)
                    t.add_done_callback(self.job_done)
            if rows and len(rows) == min(free, args.claim):
                await asyncio.sleep(0)      # more may be waiting: claim again at once
                continue
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    def job_done(self, t):
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            print(f"task error: {t.exception()!r}", file=sys.stderr)
        if self.full:
            self.wake.set()                 # a free slot, and jobs may be waiting: claim

    async def main(self):
        args = self.args
        app = f"peer worker {args.worker}"
        self.pool = await asyncpg.create_pool(
            dsn=args.dsn, min_size=args.pool, max_size=args.pool, init=self.init_conn,
            server_settings={"application_name": app})
        listen = await asyncpg.connect(dsn=args.dsn, server_settings={"application_name": app})
        await listen.add_listener("peer_job", lambda *_: self.wake.set())
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=300,
                                         ttl_dns_cache=None)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30),
            auto_decompress=False)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        print("ready", flush=True)
        claimer = asyncio.create_task(self.claimer())
        await self.stopping.wait()
        claimer.cancel()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(claimer, *self.tasks, return_exceptions=True)
        await self.session.close()
        await listen.close()
        await self.pool.close()
        print(f"stopped after {self.steps} steps", flush=True)

    def stop(self):
        self.stopping.set()
        self.wake.set()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--worker", type=int, required=True)
    ap.add_argument("--pool", type=int, default=8, help="asyncpg pool size")
    ap.add_argument("--claim", type=int, default=500, help="most jobs claimed per statement")
    ap.add_argument("--max-in-flight", type=int, default=10000)
    args = ap.parse_args()
    asyncio.run(Peer(args).main())


if __name__ == "__main__":
    main()
