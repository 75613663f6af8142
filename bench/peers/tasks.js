// bench/peers/tasks.js — Node's async functions: N trivial ones started, then awaited (all in flight at once).
// Prints one JSON line: microseconds per task, cold (first run in the process) and warm (best of the next 3).
const N = Number(process.argv[2] || 200000);
async function trivial() { return 1; }
async function once() {
  const t0 = process.hrtime.bigint();
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = trivial();
  for (let i = 0; i < N; i++) await ps[i];
  return Number(process.hrtime.bigint() - t0) / 1e3 / N;
}
(async () => {
  const cold = await once();
  let warm = Infinity;
  for (let r = 0; r < 3; r++) warm = Math.min(warm, await once());
  console.log(JSON.stringify({ cold, warm }));
})();
