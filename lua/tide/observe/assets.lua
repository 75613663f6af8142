--- tide.observe.assets — the dashboard's stylesheet and script, shipped inside tide (no resource from the internet).
--
-- The pages are rendered on the server, every value escaped there; the
-- script only re-fetches the page's main part every few seconds (the same
-- server-rendered, escaped HTML) and never builds markup from data.  The
-- Content-Security-Policy the dashboard sends allows scripts and styles
-- from these two URLs only: an inline script could not run even if one got
-- into a page.
local M = {}

M.css = [[
:root { --ink: #1c2430; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9; --head: #14213d;
        --blue: #2563eb; --green: #15803d; --red: #b42318; --amber: #b54708; --gray: #667085; --violet: #6941c6; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: var(--head); color: #fff; display: flex; align-items: center; gap: 24px; padding: 0 20px; height: 48px; }
header .brand { font-weight: 700; letter-spacing: .5px; font-size: 16px; }
header nav a { color: #cbd5e1; text-decoration: none; margin-right: 16px; padding: 14px 0; }
header nav a.on, header nav a:hover { color: #fff; border-bottom: 2px solid #fff; }
header .store { margin-left: auto; color: #94a3b8; font-size: 12px; }
.live { font-size: 12px; color: #94a3b8; }
.live.ok::before { content: "\25CF "; color: #4ade80; }
.live.bad::before { content: "\25CF "; color: #f87171; }
main { padding: 20px; max-width: 1280px; }
h1 { font-size: 20px; margin: 0 0 14px; }
h2 { font-size: 15px; margin: 22px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; white-space: nowrap; }
th { font-size: 12px; color: var(--muted); font-weight: 600; background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:hover td { background: #f9fafb; }
a { color: var(--blue); }
.muted { color: var(--muted); }
.err { color: var(--red); max-width: 420px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
.s-available { background: var(--blue); } .s-scheduled { background: var(--gray); }
.s-executing { background: var(--amber); } .s-retryable { background: #dc6803; }
.s-completed { background: var(--green); } .s-discarded { background: var(--red); }
.s-cancelled { background: #98a2b3; } .s-expired { background: var(--violet); }
.s-running { background: var(--blue); } .s-ok { background: var(--green); } .s-error { background: var(--red); }
.s-timeout { background: var(--amber); } .s-skipped { background: var(--gray); } .s-pending { background: #cfd4dc; }
.s-queued { background: #7cb2f7; }
.graph { overflow: auto; background: #fff; border: 1px solid var(--line); padding: 6px; max-height: 640px; }
form.inline { display: inline; margin: 0; }
button { font: inherit; font-size: 12px; padding: 2px 10px; border: 1px solid #cfd4dc; border-radius: 4px;
         background: #fff; cursor: pointer; }
button:hover { background: #f2f4f7; }
button.danger { color: var(--red); }
.filters { display: flex; gap: 10px; align-items: end; margin-bottom: 12px; flex-wrap: wrap; }
.filters label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
.filters input, .filters select { font: inherit; padding: 3px 6px; border: 1px solid #cfd4dc; border-radius: 4px; }
.bulk { margin: 12px 0; padding: 10px; background: #fff; border: 1px solid var(--line); }
.msg { padding: 8px 12px; background: #ecfdf3; border: 1px solid #abefc6; margin-bottom: 12px; }
pre { background: #fff; border: 1px solid var(--line); padding: 10px; overflow: auto; white-space: pre-wrap;
      word-break: break-word; font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; margin: 0; }
dl { display: grid; grid-template-columns: 160px 1fr; gap: 4px 12px; background: #fff; border: 1px solid var(--line);
     padding: 12px; margin: 0; }
dt { color: var(--muted); } dd { margin: 0; }
.pager { margin-top: 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; margin-bottom: 18px; }
.card { background: #fff; border: 1px solid var(--line); padding: 10px 14px; }
.card .v { font-size: 22px; font-weight: 700; font-variant-numeric: tabular-nums; }
.card .k { font-size: 12px; color: var(--muted); }
]]

M.js = [[
(function () {
  'use strict';
  var main = document.querySelector('main');
  var live = document.getElementById('live');
  function busy() {
    var a = document.activeElement;
    if (a && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(a.tagName)) return true;
    if (window.getSelection && String(window.getSelection()) !== '') return true;
    return document.querySelector('input[type=checkbox]:checked') !== null;
  }
  function refresh() {
    if (!document.body.hasAttribute('data-refresh') || document.hidden || busy()) return;
    var url = new URL(window.location.href);
    url.searchParams.set('partial', '1');
    fetch(url.toString(), { credentials: 'same-origin' }).then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.text();
    }).then(function (html) {
      main.innerHTML = html;
      live.textContent = 'live, updated ' + new Date().toLocaleTimeString();
      live.className = 'live ok';
    }).catch(function () {
      live.textContent = 'cannot reach the server';
      live.className = 'live bad';
    });
  }
  window.setInterval(refresh, 3000);
})();
]]

return M
