# Mutation sweep (issue 31): one mutant for each decision in SPEC section 2 and each formula the
# README's equation map cites. For each mutant: apply it, run the two trajectory tests (to count what
# they catch alone), then the tests named as its guard, and if those pass the whole suite (-x); restore.
# A mutant is CAUGHT when any test of the suite fails, SURVIVED when the whole suite passes.
# Run from the repository root of a checkout you do not edit meanwhile (it rewrites the files):
#   python results/mutation-check-sweep.py > results/mutation-check-sweep.txt
# or a slice of the list (two checkouts side by side: ... 0 42 and ... 42 54), or a list of them: ... 6,23,26
import subprocess
import sys
import time

# (what it breaks: SPEC row or equation, file, old, new, guard tests (-k))
M = [
 # losses (Eq. 7-10; SPEC "loss weights", "loss reduction", "C-N gradient")
 ("Eq. 7 smooth-L1 beta 1", "losses.py", "ct = F.smooth_l1_loss(pred_c.float(), target, beta=1.0)", "ct = F.smooth_l1_loss(pred_c.float(), target, beta=0.5)", "losses_against"),
 ("Eq. 7 mean over all elements", "losses.py", "ct = F.smooth_l1_loss(pred_c.float(), target, beta=1.0)", "ct = F.smooth_l1_loss(pred_c.float(), target, beta=1.0, reduction='sum') / len(target)", "losses_against"),
 ("Eq. 8 L_NT is smooth-L1", "losses.py", "nt = F.smooth_l1_loss(pred_n.float(), target, beta=1.0)", "nt = F.mse_loss(pred_n.float(), target)", "losses_against"),
 ("Eq. 9 L_CN is MSE", "losses.py", "cn = F.mse_loss(pred_n.float(), clean.float())", "cn = F.smooth_l1_loss(pred_n.float(), clean.float())", "losses_against"),
 ("Eq. 10 lambda1 weighs L_NT, lambda2 L_CN", "losses.py", "total = ct + lambda1 * nt + lambda2 * cn", "total = ct + lambda2 * nt + lambda1 * cn", "losses_against"),
 ("Alg. 1 l.18 no stop-gradient in L_CN", "losses.py", "clean = pred_c.detach() if cn_stopgrad else pred_c", "clean = pred_c.detach()", "l_cn_trains_both"),
 ("teacher targets detached", "losses.py", "target = target.detach().float()", "target = target.float()", "never_send_gradient"),
 ("default lambdas 0.1 / 0.1 (Table 2)", "train.py", '("lambda1",          0.1,        0.1,', '("lambda1",          0.2,        0.2,', "help_shows"),
 # noise (Eq. 3, Sec. 4.2; SPEC "noise sigma", "noise scale vs width", "noise levels", "where noise goes", "noise bound")
 ("EDM log-normal sigma = exp(P_mean + P_std xi)", "noise.py", "return torch.exp(p_mean + p_std * xi)", "return torch.exp(p_mean + p_std ** 2 * xi)", "sigma_is_lognormal"),
 ("n = sigma * eps (Eq. 3)", "noise.py", "noise = sigma[:, :, None, None] * eps", "noise = sigma[:, :, None, None] ** 2 * eps", "noise_levels"),
 ("fixed sigma = sigma_data 0.5", "noise.py", "P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5", "P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 1.0", "noise_levels"),
 ("EDM P_mean -1.2 (defaults)", "train.py", '("p_mean",           -1.2,       -1.2,', '("p_mean",           -1.0,       -1.0,', "p_mean"),
 ("--p-mean reaches the noise", "train.py", ", p_mean=cfg.p_mean, p_std=cfg.p_std)", ")", "p_mean"),
 ("multi-level noise by default (Table 3)", "train.py", '("noise",            "multi",    "multi",', '("noise",            "single",   "single",', "noise_levels or help_shows"),
 ("noise on the mask tokens' position embeddings only", "model.py", "            psi = psi + noise  # Alg. 1 line 14", "            psi = psi + 0.5 * noise  # Alg. 1 line 14", "noise_only_on_mask_tokens or noise_reaches"),
 ("no sigma bound by default", "train.py", '("sigma_max",        None,       None,', '("sigma_max",        2.0,        2.0,', "help_shows"),
 ("placed share: nearest clean embedding", "noise.py", "placed += (torch.cdist(noisy, pos).argmin(1) == j).sum().item()", "placed += (torch.cdist(noisy, pos).argmin(1) != j).sum().item()", "placed"),
 # masks (Sec. 4.3; SPEC "masks", "context cut")
 ("4 target blocks", "masks.py", "def sample_masks(batch_size, grid_h, grid_w, generator=None, n_targets=4,", "def sample_masks(batch_size, grid_h, grid_w, generator=None, n_targets=3,", "masks_invariants"),
 ("target scale (0.15, 0.2)", "masks.py", "target_scale=(0.15, 0.2)", "target_scale=(0.15, 0.3)", "masks_invariants"),
 ("target aspect (0.75, 1.5)", "masks.py", "target_aspect=(0.75, 1.5)", "target_aspect=(1.0, 1.0)", "masks_invariants"),
 ("context scale (0.85, 1.0)", "masks.py", "context_scale=(0.85, 1.0)", "context_scale=(0.5, 1.0)", "masks_invariants"),
 ("targets removed from the context", "masks.py", "context = place_block(g, ch, cw, grid_h, grid_w) & ~covered", "context = place_block(g, ch, cw, grid_h, grid_w)", "masks_invariants"),
 ("block corners reach the last row/column", "masks.py", "top = int(torch.randint(0, grid_h - h + 1, (1,), generator=generator))", "top = int(torch.randint(0, max(1, grid_h - h), (1,), generator=generator))", "masks_reach_every_cell"),
 ("min_keep as I-JEPA (10 of 196)", "masks.py", "return max(1, math.ceil(10 * grid_h * grid_w / 196))", "return max(1, math.ceil(10 * grid_h * grid_w / 392))", "min_keep_is"),
 ("a random context cut by default", "train.py", '("context_keep",     "random",   "random",', '("context_keep",     "first",    "first",', "context_keep or help_shows"),
 # predictors (Sec. 3.2, 4.2; SPEC "predictors", "predictor size")
 ("predictor width 384, half the encoder width below", "model.py", "return min(384, embed_dim // 2)", "return min(384, embed_dim // 4)", "vit_shapes or help_shows"),
 ("predictor depth 6", "train.py", '("pred_depth",       6,          6,', '("pred_depth",       4,          4,', "folder_gets"),
 ("predictor heads = encoder heads (I-JEPA)", "train.py", "student.num_heads, shared_mask_token=token)", "4, shared_mask_token=token)", "predictor_shapes"),
 ("unshared predictors by default (Table 6a)", "train.py", '("share_predictor",  False,      False,', '("share_predictor",  True,       True,', "ijepa_mode_has or training_loss_falls"),
 ("mask token trunc_normal(0.02) init", "model.py", "            nn.init.trunc_normal_(self.mask_token, std=0.02)", "            pass", "init_is_what"),
 ("predictions are the mask tokens' outputs", "model.py", "        x = self.predictor_norm(x[:, Nc:])", "        x = self.predictor_norm(x[:, -Nt:].flip(1))", "predictor_shapes"),
 # targets and the step (Alg. 1 l.9-21)
 ("targets layer-normed (I-JEPA)", "train.py", "        h = F.layer_norm(h, (h.size(-1),))", "        pass", "layer_normed"),
 ("optimizer step, then EMA (Alg. 1 l.20-21)", "train.py", "            m.optimizer.step()\n            ema_update(m.teacher, m.student, mom)", "            ema_update(m.teacher, m.student, mom)\n            m.optimizer.step()", "then_updates"),
 ("EMA theta_bar <- q theta_bar + (1 - q) theta", "train.py", "1.0 - momentum)", "momentum)", "ema_update_and"),
 # init (SPEC "init")
 ("trunc_normal std 0.02", "model.py", "def init_weights(module, std=0.02):", "def init_weights(module, std=0.01):", "init_is_what"),
 ("zero biases", "model.py", "            if m.bias is not None:\n                nn.init.zeros_(m.bias)", "            pass", "init_is_what"),
 # optimizer (SPEC "optimizer")
 ("AdamW betas (0.9, 0.999) as I-JEPA", "train.py", "betas=(0.9, 0.999)", "betas=(0.9, 0.95)", "trajectory"),
 ("no weight decay on biases and norms", "train.py", "(no_decay if p.ndim < 2 or name.endswith(\".bias\") else decay)", "(no_decay if name.endswith(\".bias\") else decay)", "ema_update_and"),
 # schedules (Sec. 4.1, 4.2, 4.4; SPEC "lr", "weight decay", "EMA momentum", "ipe_scale")
 ("lr warmup from 1e-4", "train.py", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.4, 1.0", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 0.0, 1e-6, 0.4, 1.0", "schedules_endpoints"),
 ("cosine to 1e-6", "train.py", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.4, 1.0", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 0.0, 0.4, 1.0", "schedules_endpoints"),
 ("weight decay 0.04 -> 0.4", "train.py", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.4, 1.0", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.2, 1.0", "schedules_endpoints"),
 ("EMA momentum to 1.0", "train.py", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.4, 1.0", "START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.4, 0.999", "schedules_endpoints"),
 ("EMA momentum linear", "train.py", "    return cfg.ema + (FINAL_EMA - cfg.ema) * progress", "    return cfg.ema + (FINAL_EMA - cfg.ema) * progress ** 2", "schedules_endpoints"),
 ("--lr-schedule constant holds the peak lr", "train.py", "    if cfg.lr_schedule == \"constant\":\n        return cfg.lr", "    if cfg.lr_schedule == \"constant\":\n        return cfg.lr * 0.5", "schedules_endpoints or constant"),
 ("ipe_scale 1.25 by default", "train.py", '("ipe_scale",        1.25,       1.25,', '("ipe_scale",        1.0,        1.0,', "help_shows or trajectory"),
 ("warmup min(40, 0.4 epochs)", "train.py", "cfg.warmup = min(40.0, 0.4 * cfg.epochs) if cfg.warmup is None else cfg.warmup", "cfg.warmup = min(40.0, 0.5 * cfg.epochs) if cfg.warmup is None else cfg.warmup", "warmup_default"),
 # probe (Sec. 4.5; SPEC "eval encoder", "linear probe", "low-shot", "quality curve")
 ("the student by default (Sec. 4.5)", "probe.py", 'cfg, name = raw["config"], {None: "student",', 'cfg, name = raw["config"], {None: "teacher",', "student_of_an"),
 ("average-pooled patch tokens", "probe.py", "feats.append(torch.cat([o.float().mean(1) for o in outs], dim=1).cpu())", "feats.append(torch.cat([o.float()[:, 0] for o in outs], dim=1).cpu())", "mean_over_patch_tokens"),
 ("features standardised by the training labels' statistics", "probe.py", "    x, tx = (x - mean) / std, (test_x - mean) / std", "    x, tx = (x - mean), (test_x - mean)", "standardises"),
 ("L2 grid reaches 1e-6", "probe.py", "L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)", "L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4)", "l2_grid_reaches"),
 ("refit with the chosen L2", "probe.py", "w = logreg_path(x, y, n_classes, [l2 for l2 in l2_grid if l2 >= chosen])[-1]", "w = logreg_path(x, y, n_classes, l2_grid[:1])[-1]", "refits_on_all"),
 ("low-shot subsets per class", "probe.py", "        k = max(1, int(round(fraction * len(idx))))", "        k = max(1, int(round(fraction * len(labels) / 2)))", "stratified_subset"),
 ("kNN k = 20, T = 0.07 (DINO)", "probe.py", "KNN_K, KNN_T = 20, 0.07", "KNN_K, KNN_T = 20, 0.7", "weighted_by_exp"),
 ("auto precision: bf16 on AMX and CUDA", "model.py", '    return "bf16" if device.type == "cuda" or cpu_has_amx() else "fp32"', '    return "fp32"', "cpu_bf16_attention"),
]


def pytest(*args, timeout=1800):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_njepa.py", *args],
                       capture_output=True, text=True, timeout=timeout)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    return r.returncode, last, time.time() - t


counts = {"CAUGHT": 0, "SURVIVED": 0, "BAD": 0, "trajectory": 0}
first, last = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, len(M))
picked = [int(k) for k in sys.argv[1].split(",")] if len(sys.argv) == 2 else range(first, last)  # or a list: 6,23,26
for i, (what, f, old, new, guard) in [(k, M[k]) for k in picked]:
    src = open(f).read()
    if src.count(old) != 1:
        print(f"{i:2d} BAD      {f}: {what}: the old text occurs {src.count(old)} times", flush=True)
        counts["BAD"] += 1
        continue
    open(f, "w").write(src.replace(old, new))
    try:
        rc_t, _, _ = pytest("-k", "trajectory")
        counts["trajectory"] += rc_t != 0
        rc, last, dt = pytest("-k", guard)
        how = f"guard [{guard}]"
        if rc == 0:
            rc, last, dt = pytest()
            how = "whole suite"
        verdict = "CAUGHT" if rc != 0 else "SURVIVED"
        counts[verdict] += 1
        print(f"{i:2d} {verdict:8s} {f}: {what} | trajectory {'fails' if rc_t else 'passes'} | {how}: {last} ({dt:.0f} s)", flush=True)
    finally:
        open(f, "w").write(src)
print(f"# mutants {list(picked) if len(sys.argv) == 2 else f'{first}-{last - 1}'} of {len(M)}: {counts['CAUGHT']} caught, {counts['SURVIVED']} survived, {counts['BAD']} not applied; "
      f"the trajectory tests alone catch {counts['trajectory']}", flush=True)
