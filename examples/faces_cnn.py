"""A small classifier for the aligned 25x25 face crops of scikit-image's ``lfw_subset``.

Used by ``benchmarks/prior_faces.py``: aligned faces have a strong prior (the mean face alone scores
SSIM about 0.3 against them), which is what a verdict relative to the prior must not mistake for
leakage. ``build()`` returns it untrained; the benchmark trains it on the audit's victim split.
"""

from torch import nn


class FacesCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8 x 12 x 12
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 6 x 6
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x):
        return self.classifier(self.features(x))


def build() -> nn.Module:
    return FacesCNN()
