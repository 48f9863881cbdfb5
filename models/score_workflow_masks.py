"""Score the workflow's own stitched masks on a labeled set: the tiles are run through the
main workflow as slides (tissue, plan, segment, stitch: the default masks), and each
mask.ome.tif is compared with the annotations at the tile's own resolution, by the
evaluate target's metrics (Dice, IoU, AJI, object F1).

    python models/score_workflow_masks.py slides SHEET OUT_TSV     # slide sheet for the workflow
    snakemake --cores 2 --config slides=OUT_TSV results=R tissue='{method: all}'
    python models/score_workflow_masks.py score SHEET R/<model.name> OUT_CSV

The masks' nuclei are their 8-connected components (the workflow separates touching
nuclei by background); they are brought to the tile's resolution by nearest neighbour.
Use on a held-out set only to evaluate a final model, once.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from wsiseg import labels as L  # noqa: E402
from wsiseg.mask import MaskReader  # noqa: E402
from wsiseg.metrics import all_metrics, write_metrics  # noqa: E402


def slide_sheet(sheet: str, out_tsv: str) -> None:
    rows = []
    for r in L.read_sheet(sheet).itertuples():
        mpp = r.mpp or L._xml_polygons(r.labels)[1]  # the XML's MicronsPerPixel when the sheet has none
        rows.append(f"{r.name}\t{r.image}\t{mpp}\n")
    with open(out_tsv, "w") as fh:
        fh.write("slide_id\tpath\tmpp\n" + "".join(rows))


def score(sheet: str, results: str, out_csv: str) -> None:
    rows = []
    for s in L.load_set(sheet, None, keep_native=True):
        mask = MaskReader(os.path.join(results, s.name, "mask.ome.tif"))
        full = np.zeros(mask.shape, np.uint8)
        for x, y, t in mask.tiles():
            full[y : y + t.shape[0], x : x + t.shape[1]] = t
        ids, _ = ndi.label(full == 1, structure=np.ones((3, 3)))
        pred = L.resize_labels(ids, s.native_instances.shape)
        rows.append(dict(image=s.name, mpp=s.mpp, **all_metrics(s.native_instances, pred)))
        print(f"{s.name}: dice {rows[-1]['dice']:.3f} aji {rows[-1]['aji']:.3f}")
    write_metrics(rows, out_csv)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"slides": slide_sheet, "score": score}[cmd](*rest)
