// bench/peers/dag.js — a promise DAG: N nodes in layers of 100, each after 1-3 random nodes of
// the layer before (the same shape as bench/peers.lua's), each an async function that awaits
// its dependencies and runs a trivial step.  Prints microseconds per node to define the graph
// (build the node list) and to run it, cold and warm.
const N = Number(process.argv[2] || 10000);
const WIDTH = 100;
let seed = 3;
const random = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return 1 + (seed % n); };
function define() {
  const nodes = [];
  for (let l = 0; l < N / WIDTH; l++) {
    for (let w = 0; w < WIDTH; w++) {
      const deps = [];
      if (l > 0) for (let k = random(3); k > 0; k--) deps.push((l - 1) * WIDTH + random(WIDTH) - 1);
      nodes.push({ deps, run: () => 1 });
    }
  }
  return nodes;
}
async function run(nodes) {
  const done = new Array(nodes.length);
  for (let i = 0; i < nodes.length; i++) {
    const n = nodes[i];
    done[i] = (async () => {
      for (const d of n.deps) await done[d];
      return n.run();
    })();
  }
  await Promise.all(done);
}
async function once() {
  const t0 = process.hrtime.bigint();
  const nodes = define();
  const t1 = process.hrtime.bigint();
  await run(nodes);
  const t2 = process.hrtime.bigint();
  return { define: Number(t1 - t0) / 1e3 / N, run: Number(t2 - t1) / 1e3 / N };
}
(async () => {
  const cold = await once();
  const warm = { define: Infinity, run: Infinity };
  for (let r = 0; r < 3; r++) {
    const x = await once();
    warm.define = Math.min(warm.define, x.define);
    warm.run = Math.min(warm.run, x.run);
  }
  console.log(JSON.stringify({ cold: cold.run, warm: warm.run, define_cold: cold.define, define_warm: warm.define }));
})();
