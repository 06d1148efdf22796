"""Why a slim network's latency stops following its FLOPs on CPU, from library calls.

    python benchmarks/width_latency.py [--model runs/bench/resnet20-bn] [--widths 16,12,9,8,7,6,5,4]

1. the share of the model's time spent in each kind of operator (torch's profiler, batch 256);
2. the latency at batch 256 of a ResNet-20 of each width (all stages scaled), side by side in one run:
   oneDNN's convolutions cost in steps of channel blocks, so cutting single channels may save nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import record
from torch.profiler import ProfilerActivity, profile

from cnnmod.core.cost import count_flops, latency_ms
from cnnmod.data import load
from cnnmod.models import build
from cnnmod.models.folder import load_model


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("runs/bench/resnet20-bn"))
    p.add_argument("--widths", default="16,12,9,8,7,6,5,4")
    args = p.parse_args(argv)
    clf = load_model(args.model, torch.device("cpu"))
    images = load(clf.dataset, "test").images[:256]
    x = clf.prepare(images)
    with torch.no_grad():
        clf.net(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                clf.net(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {e.key: round(e.self_cpu_time_total / total, 4) for e in events
              if e.self_cpu_time_total / total >= 0.01}
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        net = build(clf.arch, clf.spec.shape, clf.num_classes, **{**clf.arch_args, "width": width}).eval()
        rows.append({"width": width, "latency_ms": round(latency_ms(net, x, repeats=5), 1),
                     "flops": count_flops(net, x[:8])})
        print(rows[-1], flush=True)
    table = "\n".join(["| width | latency (ms, batch 256) | FLOPs per image |", "|---|---|---|"]
                      + [f"| {r['width']} | {r['latency_ms']} | {r['flops']:,} |" for r in rows])
    conv = sum(v for k, v in shares.items() if "conv" in k)
    summary = (f"{args.model.name}: convolutions {100 * conv:.0f}% of the time; latency by width: "
               + ", ".join(f"{r['width']}: {r['latency_ms']} ms" for r in rows))
    path = record(f"width_latency_{args.model.name}", f"python benchmarks/width_latency.py --model {args.model} "
                  f"--widths {args.widths}", {"operator_shares": shares, "rows": rows, "table": table}, summary)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
