"""
losses.py -- the three N-JEPA losses (paper Sec. 3.2, Eq. 7-10; Alg. 1 line 18).

  L_CT = smoothL1(pred_C, teacher)   context-teacher prediction loss  (Eq. 7; I-JEPA's loss)
  L_NT = smoothL1(pred_N, teacher)   noise-teacher prediction loss    (Eq. 8)
  L_CN = MSE(pred_N, pred_C)         denoise loss                     (Eq. 9)
  L    = L_CT + lambda1 * L_NT + lambda2 * L_CN                       (Eq. 10)

Decisions (SPEC section 2):
  * reduction: Eq. 7-9 sum over the patches of a block and average over blocks; njepa takes the
    mean over all elements of all blocks for all three losses. That is the same constant factor for
    each term, so lambda1 and lambda2 keep their meaning (and it is what I-JEPA's code does).
  * smooth-L1 with beta = 1 (the 0.5 / 1 thresholds of Eq. 7), applied element-wise as in I-JEPA.
  * L_CN has no stop-gradient (Alg. 1 line 18): it trains both predictors. `cn_stopgrad=True`
    (`--cn-stopgrad`) detaches the clean prediction, as EDM treats the clean sample as a fixed
    target (Eq. 5); an ablation, not the paper.
  * the teacher features are detached (Alg. 1 line 18, `.detach()`).
  * best weights lambda1 = lambda2 = 0.1 (Table 2); both 0 is plain I-JEPA and pred_n may be None.
"""
import torch
import torch.nn.functional as F


def njepa_loss(pred_c, pred_n, target, lambda1=0.1, lambda2=0.1, cn_stopgrad=False):
    """pred_c, pred_n, target: tensors of one shape, e.g. [B, L, Nt, D]. Returns (total, parts) with
    parts = {"ct", "nt", "cn"} as detached float32 tensors (zeros for terms that are not computed).
    cn_stopgrad: L_CN's gradient reaches predictor N only (the clean prediction is a fixed target)."""
    target = target.detach().float()
    ct = F.smooth_l1_loss(pred_c.float(), target, beta=1.0)  # Eq. 7
    if lambda1 == 0 and lambda2 == 0:
        zero = torch.zeros((), device=ct.device)
        if pred_n is None:
            return ct, {"ct": ct.detach(), "nt": zero, "cn": zero}
    if pred_n is None:
        raise ValueError("pred_n is None but lambda1/lambda2 are not both 0: predictor N must be run")
    if pred_n.shape != pred_c.shape:
        raise ValueError(f"pred_n {tuple(pred_n.shape)} and pred_c {tuple(pred_c.shape)} differ in shape")
    nt = F.smooth_l1_loss(pred_n.float(), target, beta=1.0)  # Eq. 8
    clean = pred_c.detach() if cn_stopgrad else pred_c  # Alg. 1 line 18 has no stop-gradient
    cn = F.mse_loss(pred_n.float(), clean.float())  # Eq. 9
    total = ct + lambda1 * nt + lambda2 * cn  # Eq. 10
    return total, {"ct": ct.detach(), "nt": nt.detach(), "cn": cn.detach()}
