"""Write the shipped demo checkpoint: the project's U-Net with seeded He-initialised
(untrained) weights. Usage: python scripts/make_demo_model.py models/demo-unet.pt"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from wsiseg.unet import UNet, save_checkpoint  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "models/demo-unet.pt"
torch.manual_seed(0)
model = UNet(n_classes=2, depth=4, base_width=8, padding="same", batch_norm=True).eval()
save_checkpoint(out, model, ["background", "nucleus"], mpp=0.5, name="demo-unet",
                extra={"trained": False, "note": "untrained: seeded He initialisation only"})
print(out)
