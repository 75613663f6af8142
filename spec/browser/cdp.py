#!/usr/bin/python3
"""spec/browser/cdp.py -- drives headless Chromium through the DevTools protocol, for the dashboard specs.

Usage: cdp.py STEPS.json   (prints one JSON object: results, dialogs, console errors)

Chromium runs with --remote-debugging-pipe: protocol messages are JSON
terminated by a NUL byte, read by the browser on fd 3 and written on fd 4,
so the standard library is enough (no WebSocket client).  Each step is one
of:
  {"goto": URL}                      navigate and wait for the load event
  {"eval": JS, "as": NAME}           evaluate JS (awaiting a promise); results[NAME] = value
  {"click": SELECTOR}                click the element, then wait for the page it loads
  {"wait": JS, "timeout": MS}        poll until JS is truthy (fails the run after MS)
  {"sleep": MS}
  {"viewport": [WIDTH, HEIGHT]}      resize the page's viewport
  {"screenshot": PATH}               PNG of the viewport
Every JavaScript dialog (alert, confirm, prompt) that opens is recorded in
"dialogs" and dismissed: a spec asserts that none fired.  The run gives up
after 60 s in all.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


class Browser:
    def __init__(self, width=1200, height=720):
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="tide-chromium-")

        def wire():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--remote-debugging-pipe", "--user-data-dir=" + self.profile,
             "--window-size=%d,%d" % (width, height), "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.buf = b""
        self.next_id = 0
        self.events = []
        self.dialogs = []
        self.console = []
        self.session = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method, params=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def read(self, deadline):
        while b"\0" not in self.buf:
            if time.time() > deadline:
                raise TimeoutError("no message from the browser in time")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed its pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        msg = json.loads(raw)
        method = msg.get("method")
        if method == "Page.javascriptDialogOpening":
            self.dialogs.append(msg["params"].get("message"))
            self.send("Page.handleJavaScriptDialog", {"accept": False})
        elif method == "Runtime.exceptionThrown":
            self.console.append(msg["params"]["exceptionDetails"].get("text"))
        elif method:
            self.events.append(msg)
        return msg

    def call(self, method, params=None, timeout=20):
        want = self.send(method, params)
        deadline = time.time() + timeout
        while True:
            msg = self.read(deadline)
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})

    def wait_event(self, name, timeout=20):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["method"] == name:
                    del self.events[i]
                    return e
            self.read(deadline)

    def goto(self, url):
        self.events = []
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def eval(self, js):
        r = self.call("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError("JS error: %s" % r["exceptionDetails"].get("text"))
        return r["result"].get("value")

    def click(self, selector):
        self.events = []
        found = self.eval("(function(){var e=document.querySelector(%s); if(!e) return false; e.click(); return true})()"
                          % json.dumps(selector))
        if not found:
            raise RuntimeError("nothing matches %s" % selector)
        self.wait_event("Page.loadEventFired")

    def close(self):
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    steps = json.load(open(sys.argv[1]))
    out = {"results": {}, "dialogs": [], "console": [], "error": None}
    started = time.time()
    b = Browser()
    try:
        for step in steps:
            if time.time() - started > 60:
                raise TimeoutError("the run took more than 60 s")
            if "goto" in step:
                b.goto(step["goto"])
            elif "eval" in step:
                out["results"][step["as"]] = b.eval(step["eval"])
            elif "click" in step:
                b.click(step["click"])
            elif "wait" in step:
                deadline = time.time() + step.get("timeout", 5000) / 1000
                while not b.eval(step["wait"]):
                    if time.time() > deadline:
                        raise TimeoutError("waited in vain for " + step["wait"])
                    time.sleep(0.05)
            elif "sleep" in step:
                end = time.time() + step["sleep"] / 1000
                while time.time() < end:          # keep reading: a dialog may open meanwhile
                    b.eval("1")
                    time.sleep(0.05)
            elif "viewport" in step:
                w, h = step["viewport"]
                b.call("Emulation.setDeviceMetricsOverride",
                       {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False})
            elif "screenshot" in step:
                shot = b.call("Page.captureScreenshot", {"format": "png"})
                with open(step["screenshot"], "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
    except Exception as e:  # reported in the output: the spec shows it
        out["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        out["dialogs"], out["console"] = b.dialogs, b.console
        b.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
