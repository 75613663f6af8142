// bench/peers/threads.js — a worker_threads pool of 2 workers fed with postMessage: N trivial
// jobs in flight at once, each resolved when its reply comes back (job i goes to worker i % 2).
// Prints one JSON line: microseconds per job, cold (first run, workers just started) and warm.
const { Worker } = require("worker_threads");
const N = Number(process.argv[2] || 100000);
const WORKERS = 2;
const src = `
  const { parentPort } = require("worker_threads");
  const noop = () => 1;
  parentPort.on("message", (m) => parentPort.postMessage({ id: m.id, value: noop(m.args) }));
`;
const workers = [];
const pending = new Map();
for (let i = 0; i < WORKERS; i++) {
  const w = new Worker(src, { eval: true });
  w.on("message", (m) => { const r = pending.get(m.id); pending.delete(m.id); r(m.value); });
  workers.push(w);
}
let nextId = 0;
function submit(args) {
  const id = ++nextId;
  return new Promise((resolve) => {
    pending.set(id, resolve);
    workers[id % WORKERS].postMessage({ id, args });
  });
}
async function once() {
  const t0 = process.hrtime.bigint();
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = submit([]);
  for (let i = 0; i < N; i++) await ps[i];
  return Number(process.hrtime.bigint() - t0) / 1e3 / N;
}
(async () => {
  const cold = await once();
  let warm = Infinity;
  for (let r = 0; r < 3; r++) warm = Math.min(warm, await once());
  console.log(JSON.stringify({ cold, warm }));
  for (const w of workers) await w.terminate();
})();
