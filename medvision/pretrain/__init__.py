"""Self-supervised pretraining on the user's own unlabelled images: ``medvision pretrain RECIPE``.

The method is SimCLR (Chen et al., ICML 2020): two augmented views of each image are pulled
together and pushed away from the other images of the batch by the NT-Xent loss on a small
projection head. Azizi et al. (ICCV 2021) showed that this, started from ImageNet weights and run
on unlabelled in-domain medical images, improves the fine-tuned classifier, most at few labels;
that is the recipe here. It suits CNNs (BatchNorm needs no change), works with the batch sizes of
one GPU or a CPU (64-512), and its loss is light: the (2B x 2B) similarity matrix of a batch of 256
is 1 MiB, next to the backbone's activations. Under ``torchrun`` the embeddings of every rank are
gathered (with gradients), so the negatives are the whole global batch.

- :mod:`medvision.pretrain.views`: the two-view augmentation (pathology and radiology defaults).
- :mod:`medvision.pretrain.simclr`: the projection head and the NT-Xent loss.
- :mod:`medvision.pretrain.run`: the epoch driver, the kNN health check and the run folder, whose
  ``model.safetensors`` (the backbone, without a classifier) ``model.init_from`` accepts.
"""
