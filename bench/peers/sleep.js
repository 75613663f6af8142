// bench/peers/sleep.js — Node's setTimeout: N async functions that each sleep 1 ms once, awaited.
// Prints one JSON line: microseconds per task, cold and warm (best of the next 3).
const N = Number(process.argv[2] || 100000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function sleeper() { await sleep(1); }
async function once() {
  const t0 = process.hrtime.bigint();
  const ps = new Array(N);
  for (let i = 0; i < N; i++) ps[i] = sleeper();
  for (let i = 0; i < N; i++) await ps[i];
  return Number(process.hrtime.bigint() - t0) / 1e3 / N;
}
(async () => {
  const cold = await once();
  let warm = Infinity;
  for (let r = 0; r < 3; r++) warm = Math.min(warm, await once());
  console.log(JSON.stringify({ cold, warm }));
})();
