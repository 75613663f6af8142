// bench/peers/timers.js — Node's setTimeout as a plain timer: N callbacks at random delays in
// 0..100 ms, created and fired.  Prints seconds for all of them, cold and warm (best of the next 2).
const N = Number(process.argv[2] || 1000000);
let seed = 1;
const random = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
function once() {
  return new Promise((resolve) => {
    const t0 = process.hrtime.bigint();
    let fired = 0;
    const cb = () => { if (++fired === N) resolve(Number(process.hrtime.bigint() - t0) / 1e9); };
    for (let i = 0; i < N; i++) setTimeout(cb, random() * 100);
  });
}
(async () => {
  const cold = await once();
  let warm = Infinity;
  for (let r = 0; r < 2; r++) warm = Math.min(warm, await once());
  console.log(JSON.stringify({ cold, warm }));
})();
