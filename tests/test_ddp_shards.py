"""DDP: each rank reads its own part of the training split (the data module's DistributedSampler)."""

from types import SimpleNamespace

from towers.data import CatsDogsDataModule


def test_each_rank_reads_its_own_part_of_the_training_split(demo_root, tmp_path):
    def indices(rank: int, world_size: int, epoch: int) -> list[int]:
        dm = CatsDogsDataModule(
            root=str(demo_root),
            source="kaggle",
            test_size=4,
            val_size=4,
            train_size="rest",
            resize_size=40,
            image_size=32,
            batch_size=2,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
        )
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)  # what Lightning sets under DDP
        dm.setup("fit")
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(epoch)  # as Lightning does at every epoch
        return list(sampler)

    alone = indices(0, 1, epoch=0)
    assert sorted(alone) == list(range(24))  # 32 images - 4 test - 4 validation
    for epoch in (0, 1):
        shards = [indices(rank, 2, epoch) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == 12
        assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(24))
    # the shards are the single-process order dealt out in turn (rank r takes positions r, r + 2, ...)
    assert indices(0, 2, epoch=0) == alone[0::2] and indices(1, 2, epoch=0) == alone[1::2]
    assert indices(0, 2, epoch=1) != indices(0, 2, epoch=0)  # reshuffled every epoch
