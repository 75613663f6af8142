// bench/pg/graphile.js — graphile-worker, the baseline of bench/pg/bench.lua.
//
//   node graphile.js migrate URL SCHEMA               create or update its tables
//   node graphile.js once URL SCHEMA CONFIG [TIMES]   run `noop` jobs until none is left, then exit;
//                                                     append "first_ms done_ms" to TIMES.<pid>
//   node graphile.js run URL SCHEMA CONFIG STAMPS     run `stamp` jobs until SIGTERM
//   node graphile.js enqueue URL SCHEMA one|batch N   add N `noop` jobs with addJob one at a time, or
//                                                     addJobs 5,000 at a time; print the ms it took
//
// `owntx` jobs (the own-transaction runs) insert one row into
// SCHEMA.bench_effects in a transaction of their own, on a client of
// graphile-worker's pool (helpers.withPgClient).
//
// CONFIG is "defaults" (graphile-worker's own: 1 job at a time, a pool of
// 10 connections, no batching) or "tuned:C:Q:P" (C jobs at a time, a local
// queue of Q jobs fetched per statement, a pool of P connections,
// completions batched over 1 ms: the batching its documentation recommends
// for throughput).
// `stamp` appends "id enqueued_us started_us" to STAMPS.<pid>; enqueued_us
// is the job's payload `at`, stamped by the enqueuer on the same clock.
// graphile-worker is found on NODE_PATH (bench/pg/bench.lua installs it
// under build/bench-node); success lines are silenced with NO_LOG_SUCCESS=1
// (the equivalent of tide worker's --quiet).
"use strict";
const fs = require("fs");
const { run, runOnce, runMigrations, makeWorkerUtils, Logger } = require("graphile-worker");

const [mode, url, schema, config = "defaults", stamps] = process.argv.slice(2);

const quiet = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker: ${message}`);
});

function options(taskList) {
  const opts = { connectionString: url, schema, taskList, logger: quiet };
  const tuned = /^tuned:(\d+):(\d+):(\d+)$/.exec(config);
  if (tuned) {
    opts.concurrency = Number(tuned[1]);
    opts.maxPoolSize = Number(tuned[3]);
    opts.preset = { worker: { localQueue: { size: Number(tuned[2]) }, completeJobBatchDelay: 1 } };
  } else if (config !== "defaults") {
    throw new Error(`graphile.js: CONFIG is "defaults" or "tuned:C:Q:P", got "${config}"`);
  }
  return opts;
}

function wallUs() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

async function main() {
  if (mode === "migrate") {
    await runMigrations({ connectionString: url, schema, logger: quiet });
  } else if (mode === "enqueue") {
    const how = config, n = Number(stamps);
    const utils = await makeWorkerUtils({ connectionString: url, schema, logger: quiet });
    const t0 = performance.now();
    if (how === "one") {
      for (let i = 0; i < n; i++) await utils.addJob("noop", {});
    } else {
      for (let i = 0; i < n; i += 5000) {
        const specs = [];
        for (let j = i; j < Math.min(n, i + 5000); j++) specs.push({ identifier: "noop", payload: {} });
        await utils.addJobs(specs);
      }
    }
    console.log(String(performance.now() - t0));
    await utils.release();
  } else if (mode === "once") {
    let first = 0;                         // when the first job started (wall ms)
    const tasks = {
      noop: async () => { if (!first) first = Date.now(); },
      owntx: async (payload, helpers) => {
        if (!first) first = Date.now();
        await helpers.withPgClient(async (c) => {
          await c.query("BEGIN");
          await c.query(`INSERT INTO ${schema}.bench_effects (job) VALUES ($1)`, [helpers.job.id]);
          await c.query("COMMIT");
        });
      },
    };
    await runOnce(options(tasks));
    // runOnce resolves once every completion is written and its pool closed
    if (stamps && first) fs.appendFileSync(`${stamps}.${process.pid}`, `${first} ${Date.now()}\n`);
  } else if (mode === "run") {
    const fd = fs.openSync(`${stamps}.${process.pid}`, "a");
    const stamp = async (payload, helpers) => {
      const started = wallUs();
      fs.writeSync(fd, `${helpers.job.id} ${payload.at} ${started}\n`);
    };
    const runner = await run({ ...options({ stamp }), noHandleSignals: true });
    const stop = () => { runner.stop().catch(() => {}); };
    process.once("SIGTERM", stop);
    process.once("SIGINT", stop);
    await runner.promise;
    fs.closeSync(fd);
  } else {
    throw new Error(`graphile.js: unknown mode "${mode}" (migrate, once or run)`);
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
