"""``slimjax explain``: where a config puts every parameter and how much each device holds, before
a compile or a TPU hour is spent (``--compiled`` also compiles the train step and reads back the
compiler's memory analysis and the collectives it emitted)."""

from __future__ import annotations

from typing import Sequence

from slimjax.cli.command import Command, Flag, boolean, number, size_bytes
from slimjax.errors import SlimjaxError

COMMAND = Command("explain", "show where a config puts every parameter and what each device holds", (
    Flag("device_memory", "bytes per device to check the total against (default: what the GPU/TPU reports; "
                          "unknown on CPU)", size_bytes, metavar="SIZE"),
    Flag("target", "plan for a slice this machine does not have: CHIP-COUNT as the vendor names it (v5p-64 is "
                   "32 chips, v5e-16, h100-8); shapes only, and the chip's memory becomes the default "
                   "--device_memory", metavar="CHIP-COUNT"),
    Flag("replicated_mib", "warn about replicated parameters larger than this on a multi-device mesh",
         number(0.0), 1.0, "MIB"),
    Flag("compiled", "also compile the train step: the compiler's memory analysis and the bytes each "
                     "collective moves per step, beside the layout's expected figures", boolean, False, "true|false",
         switch=True),
), details="The mesh is the config's (mesh.*) over this machine's devices; nothing is allocated unless "
           "--compiled. Activations are an estimate from the shapes (see slimjax/train/explain.py); "
           "--compiled gives the backend's real figure.", config=True)


def run(argv: Sequence[str]) -> int:
    args = COMMAND.parse(argv)
    from slimjax.config import validate
    from slimjax.tables import human_bytes
    from slimjax.train import explain

    cfg = validate(args.config)
    target = explain.Target.parse(args.target) if args.target else None
    if target is not None and args.compiled:
        raise SlimjaxError(f"--compiled needs the devices themselves; drop --target={args.target} or run on "
                           "that slice")
    plan = explain.layout(cfg, device_memory=args.device_memory,
                          replicated_warn_bytes=int(args.replicated_mib * 2**20), target=target)
    print(plan)
    if args.compiled:
        memory, collectives, expected = explain.compiled(cfg)
        print("\ncompiled train step: memory per device (compiler's analysis)")
        print(memory)
        print("\ncollectives in the compiled step (per device, per step)")
        print(collectives)
        if expected:
            print("\nexpected for this layout")
            print("\n".join(f"- {kind}: {human_bytes(nbytes)}, {what}" for kind, (nbytes, what) in expected.items()))
    return 0 if plan.fits is not False else 1
