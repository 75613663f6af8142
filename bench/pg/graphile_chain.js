// bench/pg/graphile_chain.js — a layered DAG on graphile-worker, the PostgreSQL peer of bench/flows_durable.lua.
//
//   node graphile_chain.js setup URL SCHEMA WIDTH LAYERS   its tables, the DAG's steps, the roots' jobs
//   node graphile_chain.js work URL SCHEMA CONFIG          run `step` jobs until every step is done
//   node graphile_chain.js rate URL SCHEMA                 print "steps_per_s seconds" of the run
//
// The same shape as tide's durable flow: WIDTH x LAYERS no-op steps, each
// after 2 steps of the layer before.  SCHEMA.bench_steps holds each step's
// dependencies, dependents, count of dependencies not yet done, and result.
// A `step` job runs a no-op, then in one transaction of its own (on a client
// of graphile-worker's pool) marks its step done with its result, takes one
// from each dependent's count, and adds a job (graphile_worker.add_job, in
// that transaction) for each dependent whose count reached 0, with the
// results of that dependent's dependencies in its payload (read by a second
// statement, after the row locks: so it sees every dependency's result).
// graphile-worker then marks the step's own job complete, as it does for
// every job (not in that transaction: a crash between the two runs the step
// again, and its second completion finds the step done and releases
// nothing).  The run's time is the store's: from setup's clock to the last
// step's completion (clock_timestamp() in its transaction).
//
// CONFIG is "defaults" or "tuned:C:Q:P", as in bench/pg/graphile.js.
// graphile-worker is found on NODE_PATH (bench/flows_durable.lua installs it
// under build/bench-node when missing).
"use strict";
const { run, runMigrations, Logger } = require("graphile-worker");
const { Client } = require("pg");

const [mode, url, schema, a, b] = process.argv.slice(2);

const quiet = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker: ${message}`);
});

async function client() {
  const c = new Client({ connectionString: url });
  await c.connect();
  return c;
}

async function setup(width, layers) {
  await runMigrations({ connectionString: url, logger: quiet });
  const c = await client();
  await c.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
  await c.query(`CREATE SCHEMA ${schema}`);
  await c.query(`CREATE TABLE ${schema}.bench_steps (name text PRIMARY KEY, waiting int NOT NULL,
    deps text[] NOT NULL, dependents text[] NOT NULL, result jsonb, done_at timestamptz)`);
  await c.query(`CREATE TABLE ${schema}.bench_run (started_at timestamptz NOT NULL, steps int NOT NULL)`);
  await c.query("DELETE FROM graphile_worker._private_jobs");   // (left by an earlier run)
  const name = (l, i) => `s${l}_${i}`;
  const rows = [];
  for (let l = 1; l <= layers; l++) {
    for (let i = 1; i <= width; i++) {
      const deps = l > 1 ? [name(l - 1, i), name(l - 1, (i % width) + 1)] : [];
      const dependents = l < layers ? [name(l + 1, i), name(l + 1, ((i - 2 + width) % width) + 1)] : [];
      rows.push([name(l, i), deps.length, deps, dependents]);
    }
  }
  for (let k = 0; k < rows.length; k += 1000) {
    const chunk = rows.slice(k, k + 1000);
    await c.query(`INSERT INTO ${schema}.bench_steps (name, waiting, deps, dependents)
      SELECT name, waiting, deps::text[], dependents::text[] FROM unnest($1::text[], $2::int[], $3::text[], $4::text[])
        AS t(name, waiting, deps, dependents)`,
      [chunk.map((r) => r[0]), chunk.map((r) => r[1]),
       chunk.map((r) => `{${r[2].join(",")}}`), chunk.map((r) => `{${r[3].join(",")}}`)]);
  }
  // The roots' jobs and the start time in one transaction, as tide's run row and first jobs.
  await c.query("BEGIN");
  await c.query(`INSERT INTO ${schema}.bench_run VALUES (clock_timestamp(), $1)`, [rows.length]);
  await c.query(`SELECT graphile_worker.add_job('step', json_build_object('name', name, 'results', '{}'::json))
    FROM ${schema}.bench_steps WHERE waiting = 0`);
  await c.query("COMMIT");
  await c.end();
}

async function work(config) {
  const opts = { connectionString: url, logger: quiet, noHandleSignals: false };
  const tuned = /^tuned:(\d+):(\d+):(\d+)$/.exec(config);
  const plain = /^concurrency:(\d+)$/.exec(config);
  if (plain) {
    opts.concurrency = opts.maxPoolSize = Number(plain[1]);
  } else if (tuned) {
    opts.concurrency = Number(tuned[1]);
    opts.maxPoolSize = Number(tuned[3]);
    opts.preset = { worker: { localQueue: { size: Number(tuned[2]) }, completeJobBatchDelay: 1 } };
  }
  const step = async (payload, helpers) => {
    const result = true;                     // the no-op step
    await helpers.withPgClient(async (c) => {
      await c.query("BEGIN");
      try {
        const ready = await c.query(`WITH done AS (
            UPDATE ${schema}.bench_steps SET result = $2, done_at = clock_timestamp()
            WHERE name = $1 AND done_at IS NULL RETURNING dependents)
          UPDATE ${schema}.bench_steps s SET waiting = s.waiting - 1 FROM done
          WHERE s.name = ANY (done.dependents) RETURNING s.name, s.waiting`,
          [payload.name, JSON.stringify(result)]);
        const names = ready.rows.filter((r) => r.waiting === 0).map((r) => r.name);
        if (names.length > 0) {
          await c.query(`SELECT graphile_worker.add_job('step', json_build_object('name', s.name, 'results',
              (SELECT json_object_agg(d.name, d.result) FROM ${schema}.bench_steps d WHERE d.name = ANY (s.deps))))
            FROM ${schema}.bench_steps s WHERE s.name = ANY ($1::text[])`, [names]);
        }
        await c.query("COMMIT");
      } catch (e) {
        await c.query("ROLLBACK");
        throw e;
      }
    });
  };
  const runner = await run({ ...opts, taskList: { step } });
  const c = await client();
  for (;;) {                                 // until every step is done
    const r = await c.query(`SELECT count(*)::int AS n FROM ${schema}.bench_steps WHERE done_at IS NULL`);
    if (r.rows[0].n === 0) break;
    await new Promise((res) => setTimeout(res, 100));
  }
  await c.end();
  await runner.stop();
}

async function rate() {
  const c = await client();
  const r = await c.query(`SELECT extract(epoch FROM max(s.done_at) - min(r.started_at))::float8 AS secs,
      count(*)::int AS n, count(s.done_at)::int AS done FROM ${schema}.bench_steps s, ${schema}.bench_run r`);
  await c.end();
  const { secs, n, done } = r.rows[0];
  if (done !== n) throw new Error(`graphile_chain.js: ${n - done} of ${n} steps not done`);
  console.log(`${n / secs} ${secs}`);
}

(async () => {
  if (mode === "setup") await setup(Number(a), Number(b));
  else if (mode === "work") await work(a || "defaults");
  else if (mode === "rate") await rate();
  else throw new Error(`graphile_chain.js: mode is setup, work or rate, got ${mode}`);
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
