#!/usr/bin/python3
"""spec/tools/promcheck.py -- checks a Prometheus exposition strictly; prints its samples as JSON.

Usage: promcheck.py FILE

Two checks, both must pass (exit 1 and a message otherwise):
  1. prometheus_client's own parser (Debian's python3-prometheus-client)
     reads the whole text without error;
  2. the rules of the text format 0.0.4 that a lenient parser lets through:
     every family has one HELP and one TYPE line before its samples, samples
     of a family are contiguous, names are tide_ names, counters end in
     _total, no series appears twice, histogram buckets are cumulative and
     end with le="+Inf" equal to _count, values are numbers.
Prints {"NAME{label=value,...}": value, ...} with labels sorted.
"""
import json
import math
import re
import sys

from prometheus_client.parser import text_string_to_metric_families

NAME = re.compile(r"^tide_[a-z0-9_]*[a-z0-9]$")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def fail(msg):
    print("promcheck: " + msg)
    sys.exit(1)


def family_of(name, types):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


def main():
    text = open(sys.argv[1]).read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:
        fail("prometheus_client cannot parse it: %s" % e)
    if not families:
        fail("no metric family")
    helps, types, done, seen, out = {}, {}, set(), set(), {}
    current = None
    buckets = {}
    for n, line in enumerate(text.split("\n"), 1):
        if line == "":
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, rest = line[2:6], line[7:]
            name = rest.split(" ", 1)[0]
            if not NAME.match(name):
                fail("line %d: name %r is not a tide_ name" % (n, name))
            table = helps if kind == "HELP" else types
            if name in table:
                fail("line %d: a second %s for %s" % (n, kind, name))
            if name in done:
                fail("line %d: %s comes back after other families" % (n, name))
            table[name] = rest.split(" ", 1)[1] if " " in rest else ""
            if kind == "TYPE":
                if table[name] not in ("counter", "gauge", "histogram", "summary", "untyped"):
                    fail("line %d: bad type %r" % (n, table[name]))
                if table[name] == "counter" and not name.endswith("_total"):
                    fail("line %d: counter %s does not end in _total" % (n, name))
                if name not in helps:
                    fail("line %d: TYPE before HELP for %s" % (n, name))
            if current and current != name:
                done.add(current)
            current = name
            continue
        if line.startswith("#"):
            fail("line %d: unexpected comment" % n)
        m = SAMPLE.match(line)
        if not m:
            fail("line %d: not a sample: %r" % (n, line))
        name, labels, value = m.group(1), m.group(3) or "", m.group(4)
        fam = family_of(name, types)
        if fam != current or fam not in types or fam not in helps:
            fail("line %d: sample %s outside its family's HELP/TYPE block" % (n, name))
        pairs = LABEL.findall(labels)
        if "".join('%s="%s"%s' % p for p in pairs) != labels:
            fail("line %d: bad labels %r" % (n, labels))
        try:
            v = float(value)
        except ValueError:
            fail("line %d: bad value %r" % (n, value))
        lab = sorted((k, val) for k, val, _ in pairs)
        key = name + "{" + ",".join("%s=%s" % kv for kv in lab) + "}"
        if key in seen:
            fail("line %d: series %s twice" % (n, key))
        seen.add(key)
        out[key] = v
        if name.endswith("_bucket") and types.get(fam) == "histogram":
            le = dict(lab).get("le")
            rest = tuple(kv for kv in lab if kv[0] != "le")
            buckets.setdefault((fam, rest), []).append((math.inf if le == "+Inf" else float(le), v))
    for (fam, rest), bs in buckets.items():
        if bs[-1][0] != math.inf:
            fail("%s%s: the last bucket is not +Inf" % (fam, rest))
        for (a, ca), (b, cb) in zip(bs, bs[1:]):
            if not (a < b and ca <= cb):
                fail("%s%s: buckets not ascending and cumulative" % (fam, rest))
        count = out.get(fam + "_count{" + ",".join("%s=%s" % kv for kv in rest) + "}")
        if count != bs[-1][1]:
            fail("%s%s: +Inf bucket %s but _count %s" % (fam, rest, bs[-1][1], count))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
