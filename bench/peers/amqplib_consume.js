// bench/peers/amqplib_consume.js — the baseline of bench/amqp.lua: Node's amqplib consumes and acks N messages.
//
//   node bench/peers/amqplib_consume.js URL QUEUE N PREFETCH
//
// One channel, basic.qos PREFETCH, an ack per message.  Prints one JSON line:
// { "n": N, "ms": wall time from basic.consume to the N-th ack,
//   "cpu_ms": user + system CPU of this process over the same span }.
'use strict';
const amqp = require('amqplib');

async function main() {
  const [url, queue, n, prefetch] = process.argv.slice(2);
  const N = Number(n);
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  await ch.prefetch(Number(prefetch));
  let got = 0;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await new Promise((resolve) => {
    ch.consume(queue, (msg) => {
      ch.ack(msg);
      if (++got === N) resolve();
    });
  });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  const cpu = process.cpuUsage(cpu0);
  await ch.close();
  await conn.close();
  console.log(JSON.stringify({ n: N, ms, cpu_ms: (cpu.user + cpu.system) / 1000 }));
}

main().catch((e) => { console.error(e); process.exit(1); });
