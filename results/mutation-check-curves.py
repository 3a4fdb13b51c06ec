# Written for the code before the lean-core move (run it from a checkout of commit 8a7ec03, where its
# texts stand in these files); the current sweep is results/mutation-check-sweep.py.
# Mutation check of this round's tests (online kNN, snapshots, context cut, CPU bf16, curves): each
# mutation is applied, the tests that guard it run, the file is restored. Run: python results/mutation-check-curves.py
import subprocess, sys, shutil
M = [
 ("train.py", "(q @ bank.T).topk(k, dim=1)", "(q @ bank.T).topk(k, dim=1, largest=False)", "knn_separates"),
 ("train.py", "                encoder.train(was_training)", "                pass", "online_knn_leaves"),
 ("train.py", "        t0 = time.perf_counter()\n        res = {}", "        t0 = time.perf_counter()\n        torch.rand(1)\n        res = {}", "online_knn_leaves"),
 ("masks.py", 'if context_keep == "first":', 'if False:', "context_keep_first"),
 ("train.py", "    if not keep_every:\n        return set()", "    if True:\n        return set()", "snapshots_are"),
 ("probe.py", 'root = cfg.get("data_path") if', 'root = None if', "trained_on"),
 ("probe.py", "arms.setdefault(json.dumps(arm_config(cfg), sort_keys=True), [])", "arms.setdefault(json.dumps(cfg, sort_keys=True), [])", "learning_curves"),
 ("model.py", 'if q.device.type == "cpu" and q.dtype == torch.bfloat16:', 'if False:', "cpu_bf16_attention"),
 ("probe.py", 'r.get("solver"), result_epoch(r))', 'r.get("solver"), None)', "snapshots_are"),
 ("probe.py", 'if r.get("label_fraction") == 1.0 and r.get("encoder")', 'if r.get("encoder")', "learning_curves"),
 ("train.py", "            return x\n        per = ", "            return x\n        return x\n        per = ", "ddp_two"),
 ("train.py", "math.ceil(KNN_COST * sum(n for *_, n in self.sets) / (0.1 * len(train_set)))", "1", "without_a_val"),
]
for f, a, b, k in M:
    src = open(f).read()
    assert src.count(a) == 1, (f, a)
    open(f, "w").write(src.replace(a, b))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "test_njepa.py", "-k", k], capture_output=True, text=True, timeout=600)
        last = r.stdout.strip().splitlines()[-1]
        print(("CAUGHT " if r.returncode != 0 else "MISSED ") + f"{f}: {a[:50]!r} -> {b[:40]!r} | {last}", flush=True)
    finally:
        open(f, "w").write(src)
