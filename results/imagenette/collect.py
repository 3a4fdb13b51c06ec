"""Copy what a finished (or partial) run of the ImageNette study leaves behind into results/imagenette/
RUN/: log.jsonl thinned (every online kNN line, every 100th step's loss line, the last line), the
snapshots' probe results (probe.jsonl, and one probe-eE-labelsP.json per epoch and label fraction, the
latest, for tools/report.py --table) and the config. python results/imagenette/collect.py runs/in-*
(--dest DIR: one run into DIR instead, e.g. the mission's command: --dest results/mission out)"""
import argparse
import json
import os
import shutil
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the repository root: probe.py, tools/report.py
import probe  # noqa: E402
from tools import report  # noqa: E402
parser = argparse.ArgumentParser(description="Copy runs of the ImageNette study into results/imagenette/RUN/ (thinned)")
parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. runs/in-*")
parser.add_argument("--dest", help="with one run: copy it into this folder instead of results/imagenette/RUN")
args = parser.parse_args()
if args.dest and len(args.runs) > 1:
    parser.error("--dest takes one run")
for run in args.runs:
    name = os.path.basename(os.path.normpath(run))
    dest = args.dest or os.path.join(here, name)
    os.makedirs(dest, exist_ok=True)
    recs = probe.read_log(os.path.join(run, "log.jsonl"))
    keep = [r for i, r in enumerate(recs) if "knn_student" in r or r["step"] % 100 == 0 or i == len(recs) - 1]
    with open(os.path.join(dest, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    if os.path.exists(os.path.join(run, "probe.jsonl")):
        shutil.copy(os.path.join(run, "probe.jsonl"), os.path.join(dest, "probe.jsonl"))
        latest = {}  # (epoch, label fraction) -> the last student, last-layer result
        for r in probe.read_log(os.path.join(run, "probe.jsonl")):
            if r.get("encoder") == "student" and r.get("last_layers") == 1:
                latest[(round(report.result_epoch(r)), r["label_fraction"])] = r
        for (epoch, fraction), r in latest.items():
            with open(os.path.join(dest, f"probe-e{epoch}-labels{100 * fraction:g}.json"), "w") as f:
                json.dump(r, f, indent=1)
    cfg = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)["config"]
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    last = [r for r in recs if "loss" in r][-1]
    print(f"{name}: step {last['step']} (epoch {last['epoch']:g}), {len(keep)} log lines, wall {last.get('wall_s')} s")
