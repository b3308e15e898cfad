"""Why ARGD-SI collapses on GTSRB's label-consistent model with seed 0 (a diagnostic, not part of the product).

Runs main-ARGD.py unchanged and records, at every training step, ARGD's loss terms (the vertex term of each
group, the edge and the embedding terms: defenses/argd.py's own functions) separately on the rows that carry
the synthesised trigger (the first --adv_share of each batch) and on the clean rest. From the repository root:

    python results/argd_si_terms/argd_si_terms.py OUT.csv main-ARGD.py --defense argd-si --s_model M ...
"""
import csv
import os
import runpy
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import defenses.argd as argd  # noqa: E402
from adversarial import share_count  # noqa: E402
from config import DEFENSE  # noqa: E402

out, sys.argv = sys.argv[1], sys.argv[2:]
stamped_rows = 'argd-si' in sys.argv or 'inverted' in sys.argv
rows = []
forward = argd.ARGDLoss.forward


def recording_forward(self, feats_s, feats_t):
    if torch.is_grad_enabled():  # a training step (evaluation computes no loss)
        with torch.no_grad():
            n = feats_s[0].shape[0]
            k = share_count(DEFENSE['adv_share'], n) if stamped_rows else 0
            maps_s = [argd.attention_map(f.float(), self.p) for f in feats_s]
            maps_t = [argd.attention_map(f.float(), self.p) for f in feats_t]
            row = {'step': len(rows)}
            for part, rows_of in (('stamped', slice(0, k)), ('clean', slice(k, n))):
                if rows_of.stop - rows_of.start < 2:
                    continue
                s, t = [m[rows_of] for m in maps_s], [m[rows_of] for m in maps_t]
                for g, w in enumerate(self.vert_weights):
                    row[f'{part}_vert{g + 1}'] = round(float(w * F.mse_loss(s[g], t[g])), 4)
                row[f'{part}_edge'] = round(float(argd.edge_loss(s, t)), 4)
                row[f'{part}_emb'] = round(float(self.embedding(self.embedding_weights(s, t), s, t)), 4)
            rows.append(row)
    return forward(self, feats_s, feats_t)


argd.ARGDLoss.forward = recording_forward
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    with open(out, 'w', newline='') as f:
        writer = csv.DictWriter(f, sorted({k for r in rows for k in r}, key=lambda k: (k != 'step', k)))
        writer.writeheader()
        writer.writerows(rows)
    print('wrote', len(rows), 'steps to', out)
