"""Worker for test_distributed's release test, run under torchrun: train the config given as
argv[1], then print whether the process group object outlived ``train()``."""

import gc
import sys
import weakref

import torch.distributed as dist
import yaml

from moeforge.train import train


class _GrabGroup:
    def on_train_end(self, trainer, result):
        _GrabGroup.ref = weakref.ref(dist.group.WORLD)


result = train(yaml.safe_load(open(sys.argv[1])), callbacks=[_GrabGroup()])
# no gc.collect() here: what train() left behind must not wait for the cycle collector
print(f"rank-state group_alive={_GrabGroup.ref() is not None} model_kept={result.model is not None}", flush=True)
gc.collect()
