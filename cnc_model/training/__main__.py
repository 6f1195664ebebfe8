"""``python -m cnc_model.training --config ... [--set k=v ...] [--resume latest]``.

The module form of ``cnc train`` for launchers that take a module::

    accelerate launch --num_processes 8 -m cnc_model.training --config configs/train/local.yaml --set ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m cnc_model.training --config ...
"""

from cnc_model.train_cli import main

if __name__ == "__main__":
    main()
