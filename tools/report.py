"""
tools/report.py -- results across runs: tables, learning curves and overlaid training curves, from
probe JSON files and run folders (live runs/ or their committed copies under results/). Not the
method: it reads what train.py and probe.py wrote.

  python tools/report.py --table results/imagenette/in-*-50ep-s*/probe-e*.json   # mean ± std by arm, paired
  python tools/report.py --table runs/*/probe*.json --table-json rows.json       # ... and the rows as JSON
  python tools/report.py --table results/imagenette/in-*-50ep-s*/probe-e*.json --vs lr_schedule=cosine  # ... and to the cosine twin
  python tools/report.py --curves results/imagenette/in-{ijepa,njepa}-50ep-s* --curves-out docs/learning-curve.png
  python tools/report.py --plot runs/a runs/b --plot-out curves.png             # training curves overlaid
  python tools/report.py --compare runs/a results/imagenette/a                  # the same trajectory? (step by step)

Arms are runs that share every option but the seed (and bookkeeping such as the device); seeds pair
runs across arms, so an arm's difference to its I-JEPA twin is the mean ± std of per-seed differences.
"""
import argparse
import glob
import json
import math
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model  # noqa: E402
import probe  # noqa: E402
import train  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Tables: runs grouped by config, mean ± std over pretraining seeds, paired differences to I-JEPA
# ---------------------------------------------------------------------------------------------
# Config entries that do not define an arm: the seed pairs runs, the rest is bookkeeping.
NOT_ARM = {"seed", "out", "device", "compile", "workers", "log_every", "max_steps", "classes", "init_from", "eval_every",
           "knn_bank", "knn_queries", "keep_every", "precision"}  # precision: how, not what (like device, compile)


def mean_std(xs):
    """Mean and sample std (n - 1) of a list; std None for one value (a spread needs two)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


# The N-JEPA defaults of the switches an arm may change (train.OPTIONS); a name lists only departures.
ARM_DEFAULTS = {"noise": "multi", "noise_dist": "lognormal", "p_mean": -1.2, "p_std": 1.2, "cn_stopgrad": False, "sigma_max": None,
                "share_predictor": False, "share_mask_token": False}


def arm_name(cfg, common):
    """A short name for a config: the method, plus the options that differ from the other arms and
    from the N-JEPA defaults (e.g. "N-JEPA noise=none"); I-JEPA ignores the noise options."""
    ijepa = cfg.get("lambda1") == 0 and cfg.get("lambda2") == 0
    extra = [f"{k}={cfg[k]}" for k in sorted(cfg) if k not in common and k not in ("lambda1", "lambda2")
             and not (k in ARM_DEFAULTS and (ijepa or cfg[k] == ARM_DEFAULTS[k]))]
    if not ijepa and (cfg.get("lambda1"), cfg.get("lambda2")) != (0.1, 0.1):
        extra.insert(0, f"lambda={cfg.get('lambda1')}/{cfg.get('lambda2')}")
    return " ".join(["I-JEPA" if ijepa else "N-JEPA"] + extra)


def arm_config(cfg):
    """The options that define an arm, with today's defaults filled in for options a run predates and
    the derived width resolved, so that runs of older code group with their peers."""
    if not cfg:
        return {}
    arm = {name: cfg.get(name, small) for name, _, small, _, _ in train.OPTIONS if name not in NOT_ARM}
    return vars(train.fill_derived(SimpleNamespace(**arm)))


NOISE_OPTIONS = ("lambda1", "lambda2", "noise", "noise_dist", "p_mean", "p_std", "cn_stopgrad", "sigma_max")  # what N-JEPA adds to I-JEPA


def is_ijepa(arm):
    return arm.get("lambda1") == 0 and arm.get("lambda2") == 0


def ijepa_twin(arm, arms):
    """The I-JEPA arm among `arms` that differs from `arm` in the noise options only: its paired reference."""
    return next((a for a in arms if is_ijepa(a) and all(a.get(k) == arm.get(k) for k in arm if k not in NOISE_OPTIONS)), None)


def njepa_twin(arm, arms):
    """The N-JEPA arm with the paper's defaults (lambdas 0.1 / 0.1, every noise option at ARM_DEFAULTS)
    among `arms` that differs from `arm` in the noise options only; None for I-JEPA and for itself."""
    paper = lambda a: (a.get("lambda1"), a.get("lambda2")) == (0.1, 0.1) and all(a.get(k) == v for k, v in ARM_DEFAULTS.items())
    return next((a for a in arms if paper(a) and a != arm and not is_ijepa(arm)
                 and all(a.get(k) == arm.get(k) for k in arm if k not in NOISE_OPTIONS)), None)


def parse_vs(text):
    """--vs 'lr_schedule=cosine,lambda1=0' -> {option: value}, each value read with its train.OPTIONS type."""
    types = {name: typ for name, _, _, typ, _ in train.OPTIONS if name not in NOT_ARM}
    change = {}
    for part in text.split(","):
        name, sep, value = (x.strip() for x in part.partition("="))
        name = name.lstrip("-").replace("-", "_")
        try:
            if not sep or name not in types:
                raise ValueError
            typ = types[name]
            change[name] = None if value == "None" else value in ("1", "true", "True") if typ is bool else typ(value)
        except ValueError:
            raise ValueError(f"--vs {text}: give OPTION=VALUE[,OPTION=VALUE...] with OPTION an arm's option of train.py "
                             f"and VALUE of its type (e.g. --vs lr_schedule=cosine)") from None
    return change


def changed_twin(arm, arms, change):
    """The arm among `arms` that is `arm` with the options in `change` set to their values (--vs); None
    where no such arm exists or it is `arm` itself."""
    want = dict(arm, **change)
    return next((a for a in arms if a == want), None) if want != arm else None


def paired(by_seed, ref):
    """Per-seed differences (points) of an arm's results to its reference's, over the seeds both have."""
    ref_by_seed = {r["config"].get("seed"): r for r in ref} if ref else {}
    return [100 * (by_seed[s]["top1"] - ref_by_seed[s]["top1"]) for s in sorted(by_seed) if s in ref_by_seed]


def result_epoch(r):
    """The epoch a probe result was taken at: recorded since snapshots exist, else the run's length."""
    e = r.get("epoch", r.get("config", {}).get("epochs"))
    return round(e, 2) if e is not None else None


def table(results, vs_njepa=False, vs=()):
    """Group probe results by (arm config, probe settings, epoch: snapshots of one run are points of its
    curve, ordered by epoch). Returns (rows, text). vs_njepa: also the paired difference to the N-JEPA
    arm with the paper's defaults (`--vs-njepa`); vs: [(label, {option: value})], for each a column of
    the paired difference to the arm with those options changed (`--vs lr_schedule=cosine`)."""
    groups = {}
    for r in results:
        arm = arm_config(r.get("config", {}))
        probe_key = (r.get("encoder"), r.get("last_layers"), r.get("label_fraction"), r.get("solver"), result_epoch(r))
        groups.setdefault(json.dumps([arm, probe_key], sort_keys=True), []).append(r)
    arms = [json.loads(k)[0] for k in groups if json.loads(k)[0]]
    common = {k: v for k, v in arms[0].items() if all(a.get(k) == v for a in arms)} if arms else {}
    rows = []
    for key, runs in groups.items():
        arm, probe_key = json.loads(key)
        by_seed = {r["config"].get("seed"): r for r in runs}
        peers = [json.loads(k2)[0] for k2 in groups if json.loads(k2)[1] == probe_key]  # arms probed the same way
        group_of = lambda a: groups[json.dumps([a, probe_key], sort_keys=True)] if a is not None else None
        ref = group_of(ijepa_twin(arm, peers))
        diffs = paired(by_seed, ref)
        gains = [100 * r["gain"] for r in runs if "gain" in r]
        tops = [100 * r["top1"] for r in runs]
        label = arm_name(arm, common) if arm else os.path.basename(str(runs[0].get("ckpt")))  # e.g. an I-JEPA file
        rows.append({"arm": label, "probe": dict(zip(("encoder", "last_layers", "label_fraction", "solver", "epoch"), probe_key)),
                     "seeds": sorted(by_seed), "top1": mean_std(tops),
                     "random_init": mean_std([100 * r["random_init"]["top1"] for r in runs if "random_init" in r]) if gains else None,
                     "gain": mean_std(gains) if gains else None,
                     "vs_ijepa": mean_std(diffs) if diffs and ref is not runs else None, "pairs": len(diffs),
                     "collapsed": sum(bool(r.get("train", {}).get("collapsed")) for r in runs),
                     "teacher_std": mean_std([r["train"]["final_teacher_std"] for r in runs if r.get("train")])
                     if any(r.get("train") for r in runs) else None, "config": arm})
        if vs_njepa:
            diffs_n = paired(by_seed, group_of(njepa_twin(arm, peers)))
            rows[-1].update(vs_njepa=mean_std(diffs_n) if diffs_n else None, pairs_njepa=len(diffs_n))
        rows[-1]["vs"] = {}
        for name, change in vs:
            diffs_c = paired(by_seed, group_of(changed_twin(arm, peers, change)))
            rows[-1]["vs"][name] = {"diff": mean_std(diffs_c) if diffs_c else None, "pairs": len(diffs_c)}
    rows.sort(key=lambda r: (r["probe"]["label_fraction"] != 1.0, r["arm"] != "I-JEPA", r["arm"], r["probe"]["epoch"] or 0))
    fmt = lambda ms, d=2: "" if not ms else f"{ms[0]:.{d}f}" + (f" ± {ms[1]:.{d}f}" if ms[1] is not None else "")
    head = ["arm", "epoch", "labels", "n", "top-1 %", "random init %", "gain over random", "vs I-JEPA (paired)", "collapsed", "teacher_std"]
    pairs = lambda r: f" ({r['pairs']} pair{'s' * (r['pairs'] > 1)})" if r["vs_ijepa"] else ""
    cells = [[r["arm"], f"{r['probe']['epoch']:g}" if r["probe"]["epoch"] is not None else "", f"{100 * r['probe']['label_fraction']:g}%", str(len(r["seeds"])), fmt(r["top1"]), fmt(r["random_init"]),
              fmt(r["gain"]), fmt(r["vs_ijepa"]) + pairs(r), f"{r['collapsed']} of {len(r['seeds'])}", fmt(r["teacher_std"], 3)]
             for r in rows]
    if vs_njepa:
        head.insert(8, "vs N-JEPA (paired)")
        for c, r in zip(cells, rows):
            c.insert(8, fmt(r["vs_njepa"]) + (f" ({r['pairs_njepa']})" if r["vs_njepa"] else ""))
    for name, _ in vs:
        head.insert(len(head) - 2, f"vs {name} (paired)")
        for c, r in zip(cells, rows):
            d = r["vs"][name]
            c.insert(len(c) - 2, fmt(d["diff"]) + (f" ({d['pairs']})" if d["diff"] else ""))
    width = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, width))) + " |"
    lines = [line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(c) for c in cells]
    return rows, "\n".join(lines)


def read_results(paths):
    """Probe results from JSON files (probe.json or copies of it); a probe.jsonl gives its last line."""
    results = []
    for p in paths:
        with open(p) as f:
            text = f.read().strip()
        if not text:
            continue
        results.append(json.loads(text.splitlines()[-1]) if p.endswith(".jsonl") else json.loads(text))
    return results


# ---------------------------------------------------------------------------------------------
# Learning curves: kNN (from log.jsonl) and probe (from the snapshots' results) against epochs,
# mean over the pretraining seeds of each arm with a band from the lowest to the highest seed
# ---------------------------------------------------------------------------------------------
def run_points(folder):
    """(config, kNN points [(epoch, student, teacher)], probe points [(epoch, top1, random-init top1)])
    of one run folder (or a committed copy of it): log.jsonl, and probe.jsonl or probe*.json (student,
    last layer, all labels; the latest result per epoch)."""
    recs = probe.read_log(os.path.join(folder, "log.jsonl"))
    knn = [(r["epoch"], 100 * r["knn_student"], 100 * r["knn_teacher"]) for r in recs if "knn_student" in r]
    jsonl = os.path.join(folder, "probe.jsonl")
    results = probe.read_log(jsonl) if os.path.exists(jsonl) else read_results(sorted(glob.glob(os.path.join(folder, "probe*.json"))))
    probes = {}
    for r in results:
        if r.get("label_fraction") == 1.0 and r.get("encoder") == "student" and r.get("last_layers") == 1 and "random_init" in r:
            probes[result_epoch(r)] = (result_epoch(r), 100 * r["top1"], 100 * r["random_init"]["top1"])
    config = next((r["config"] for r in results if r.get("config")), None)
    if config is None and os.path.exists(os.path.join(folder, "config.json")):  # a committed copy (results/)
        config = json.load(open(os.path.join(folder, "config.json")))
    if config is None and os.path.exists(os.path.join(folder, "ckpt.pt")):  # a run not probed yet
        config = model.load_checkpoint(os.path.join(folder, "ckpt.pt"))["config"]
    return config or {}, knn, sorted(probes.values())


def curve_bands(runs, column):
    """{epoch: (mean, low, high, n)} over the runs' points of one column (1 = kNN student / probe)."""
    by_epoch = {}
    for points in runs:
        for pt in points:
            by_epoch.setdefault(round(pt[0], 2), []).append(pt[column])
    return {e: (sum(v) / len(v), min(v), max(v), len(v)) for e, v in sorted(by_epoch.items())}


def group_by_arm(runs):
    """Runs [(config, knn, probes)] grouped by arm config (JSON key, in first-seen order), and the
    options all arms share (left out of the arms' names)."""
    arms = {}
    for run in runs:
        arms.setdefault(json.dumps(arm_config(run[0]), sort_keys=True), []).append(run)
    configs = [json.loads(k) for k in arms]
    common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)} if configs else {}
    return arms, common


def knn_curve_table(runs):
    """The numbers behind the kNN panel, as a markdown table: per epoch and arm, the student's online kNN
    top-1 (mean ± std over seeds) and, for an arm with an I-JEPA twin among the runs, its paired difference
    to I-JEPA (the same seed's kNN at the same epoch): does the gap open, close or stay along the curve?
    runs: [run_points(folder), ...]."""
    grouped, common = group_by_arm(runs)
    arms = {key: {cfg.get("seed"): {round(e, 2): s for e, s, _ in knn} for cfg, knn, _ in group}
            for key, group in grouped.items()}  # arm -> {seed: {epoch: kNN student %}}
    configs = [json.loads(k) for k in arms]

    def fmt(xs):
        if not xs:
            return ""
        m, sd = mean_std(xs)
        return f"{m:.1f}" + (f" ± {sd:.1f}" if sd is not None else "") + f" ({len(xs)})"

    head, columns = ["epoch"], []  # columns: (arm seeds, I-JEPA twin seeds or None)
    for cfg, seeds in zip(configs, arms.values()):
        twin = ijepa_twin(cfg, configs) if not is_ijepa(cfg) else None
        head.append(f"{arm_name(cfg, common)} kNN %")
        columns.append((seeds, None))
        if twin is not None:
            head.append(f"{arm_name(cfg, common)} - {arm_name(twin, common)} (paired)")
            columns.append((seeds, arms[json.dumps(twin, sort_keys=True)]))
    epochs = sorted({e for seeds in arms.values() for points in seeds.values() for e in points})
    rows = []
    for e in epochs:
        cells = [f"{e:g}"]
        for seeds, ref in columns:
            if ref is None:
                cells.append(fmt([pts[e] for pts in seeds.values() if e in pts]))
            else:
                cells.append(fmt([pts[e] - ref[s][e] for s, pts in seeds.items() if e in pts and e in ref.get(s, {})]))
        rows.append(cells)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in rows])


def draw_learning_curves(runs, path):
    """A PNG (pillow): left the online kNN top-1 of the student (thick) and teacher (thin), right the
    linear-probe top-1 of the snapshots, against epochs; one colour per arm, the mean over its seeds
    with a shaded band from the lowest to the highest seed; grey: the random-init level (kNN at step 0,
    the probe's random-init twin), averaged over all runs. runs: [run_points(folder), ...]."""
    from PIL import Image, ImageDraw
    arms, common = group_by_arm(runs)
    W, H, pad, legend = 460, 300, 44, 18 * len(arms) + 8
    sheet = Image.new("RGB", (2 * W, H + legend), "white")
    # source: which list of a run (config, knn, probes) a panel draws
    panels = [("online kNN top-1 % (thick: student, thin: teacher)", [(1, 3), (2, 1)], 1), ("linear probe top-1 %", [(1, 3)], 2)]
    for p, (title, columns, source) in enumerate(panels):
        series = [(j, col, width, curve_bands([r[source] for r in group], col))
                  for j, group in enumerate(arms.values()) for col, width in columns]
        base = [r[1][0][1] for r in runs if source == 1 and r[1] and r[1][0][0] == 0] or \
               [pt[2] for r in runs if source == 2 for pt in r[2]]
        values = [v for *_, bands in series for m, lo, hi, n in bands.values() for v in (lo, hi)] + base
        epochs = [e for *_, bands in series for e in bands]
        if len(epochs) < 1 or not values:
            continue
        x0, lo, hi, last = p * W, min(values) - 1, max(values) + 1, max(epochs) or 1
        sx = lambda e: x0 + pad + e / last * (W - pad - 12)
        sy = lambda v: H - 24 - (v - lo) / (hi - lo) * (H - 54)
        overlay = Image.new("RGBA", sheet.size, (0, 0, 0, 0))
        od = ImageDraw.Draw(overlay)
        for j, col, width, bands in series:  # bands first, lines on top
            pts = list(bands.items())
            if width > 1 and len(pts) > 1 and any(n > 1 for _, (_, _, _, n) in pts):
                poly = [(sx(e), sy(b[2])) for e, b in pts] + [(sx(e), sy(b[1])) for e, b in reversed(pts)]
                od.polygon(poly, fill=train.CURVE_COLOURS[j % len(train.CURVE_COLOURS)] + (60,))
        sheet.paste(Image.alpha_composite(sheet.convert("RGBA"), overlay).convert("RGB"))
        d = ImageDraw.Draw(sheet)
        d.rectangle([x0 + pad, 30, x0 + W - 12, H - 24], outline=(160, 160, 160))
        d.text((x0 + pad, 10), title, fill="black")
        if base:
            y = sy(sum(base) / len(base))
            for x in range(int(x0 + pad), int(x0 + W - 12), 8):  # dashed: the random-init level
                d.line([(x, y), (x + 4, y)], fill=(120, 120, 120), width=1)
            d.text((x0 + W - 80, y - 13), f"random {sum(base) / len(base):.1f}", fill=(110, 110, 110))
        for j, col, width, bands in series:
            colour = train.CURVE_COLOURS[j % len(train.CURVE_COLOURS)]
            pts = [(sx(e), sy(b[0])) for e, b in bands.items()]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=width)
            for x, y in pts:
                d.ellipse([x - width, y - width, x + width, y + width], fill=colour)
        d.text((x0 + 2, 30), f"{hi:.0f}", fill=(90, 90, 90))
        d.text((x0 + 2, H - 36), f"{lo:.0f}", fill=(90, 90, 90))
        d.text((x0 + W - 70, H - 18), f"epoch {last:g}", fill=(90, 90, 90))
    d = ImageDraw.Draw(sheet)
    for j, (key, group) in enumerate(arms.items()):
        d.text((10, H + 4 + 18 * j), f"-- {arm_name(json.loads(key), common)}  ({len(group)} seed{'s' * (len(group) > 1)})",
               fill=train.CURVE_COLOURS[j % len(train.CURVE_COLOURS)])
    sheet.save(path)


# ---------------------------------------------------------------------------------------------
# Two logs of one run (restarted, resumed, on another machine or commit): the same trajectory?
# ---------------------------------------------------------------------------------------------
LOGGED = ("loss", "ct", "nt", "cn", "lr", "knn_student", "knn_teacher")  # what a log.jsonl line records of the run itself


def log_by_step(path):
    """{step: {number: value}} of a run folder's log.jsonl (or the file itself); a step's loss line and
    kNN line are merged."""
    log = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(log):
        raise ValueError(f"no log at {log}")
    steps = {}
    for r in probe.read_log(log):
        steps.setdefault(r["step"], {}).update({k: r[k] for k in LOGGED if r.get(k) is not None})
    return steps


def compare_logs(a, b):
    """(steps both logs recorded, {number: largest relative difference at those steps}); all 0.0 means
    the two runs are bit-identical wherever both logged."""
    la, lb = log_by_step(a), log_by_step(b)
    common = sorted(set(la) & set(lb))
    worst = {}
    for s in common:
        for k in set(la[s]) & set(lb[s]):
            d = abs(la[s][k] - lb[s][k]) / max(abs(lb[s][k]), 1e-12)
            worst[k] = max(worst.get(k, 0.0), d)
    return common, worst


def main(argv=None):
    p = argparse.ArgumentParser(description="Tables and curves across runs (from probe JSON files and run folders)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="probe results (probe*.json, probe.jsonl: its last line): mean ± std by arm")
    p.add_argument("--table-json", help="with --table: also write the table's rows to this JSON file")
    p.add_argument("--vs-njepa", action="store_true", help="with --table: also the paired difference to the N-JEPA arm with the "
                                                           "paper's defaults (same other options)")
    p.add_argument("--vs", action="append", default=[], metavar="OPTION=VALUE[,...]",
                   help="with --table: also the paired difference to the arm that is each arm with these options changed "
                        "(e.g. lr_schedule=cosine; lambda1=0,lambda2=0: to I-JEPA); repeatable, one column each")
    p.add_argument("--curves", nargs="+", metavar="RUN_DIR", help="draw kNN and probe against epochs of these runs (mean and band "
                                                                  "per arm) and print the kNN numbers (mean ± std, paired to I-JEPA) ...")
    p.add_argument("--curves-out", default="learning-curve.png", help="... into this PNG")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="overlay the training curves of these runs (their log.jsonl) ...")
    p.add_argument("--plot-out", default="curves.png", help="... into this PNG")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="the steps two logs of one run share (run folders or "
                                                                         "log.jsonl files) and the largest relative difference of each number")
    args = p.parse_args(argv)
    if not (args.table or args.curves or args.plot or args.compare):
        p.error("give --table, --curves, --plot or --compare")
    try:
        if args.compare:
            steps, worst = compare_logs(*args.compare)
            if not steps:
                raise ValueError(f"{args.compare[0]} and {args.compare[1]} share no logged step")
            print(f"{len(steps)} steps in both logs ({steps[0]} .. {steps[-1]}); largest relative difference: "
                  + ", ".join(f"{k} {worst[k]:.1e}" for k in LOGGED if k in worst)
                  + (" (bit-identical)" if not any(worst.values()) else ""))
        if args.plot:
            train.draw_curves({os.path.basename(os.path.normpath(r)): probe.read_log(os.path.join(r, "log.jsonl")) for r in args.plot},
                              args.plot_out)
            print(f"wrote {args.plot_out}: {len(args.plot)} runs")
        if args.curves:
            runs = [run_points(f) for f in args.curves]  # read once: the picture and its numbers
            draw_learning_curves(runs, args.curves_out)
            print(f"wrote {args.curves_out}: {len(runs)} runs; the kNN panel's numbers (mean ± std (seeds)):")
            print(knn_curve_table(runs))
        if args.table:
            vs = [(v, parse_vs(v)) for v in args.vs]  # a misspelt option fails before any file is read
            results = read_results([f for pat in args.table for f in sorted(glob.glob(pat)) or [pat]])
            if not results:
                raise ValueError("--table found no results")
            rows, text = table(results, vs_njepa=args.vs_njepa, vs=vs)
            print(text)
            if args.table_json:
                with open(args.table_json, "w") as f:
                    json.dump(rows, f, indent=1)
        return 0
    except (ValueError, OSError) as e:  # json.JSONDecodeError and model.CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
