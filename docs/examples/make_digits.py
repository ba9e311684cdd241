"""Write scikit-learn's 1,797 genuine 8×8 digit images (they ship with scikit-learn: offline) as a tensors file.

    python docs/examples/make_digits.py outputs/digits.pt
"""
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

digits = load_digits()
path = Path(sys.argv[1] if len(sys.argv) > 1 else "digits.pt")
path.parent.mkdir(parents=True, exist_ok=True)
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
torch.save({"x": x, "y": torch.tensor(digits.target)}, path)
print(f"{path}: {tuple(x.shape)} inputs, {len(digits.target)} labels")
