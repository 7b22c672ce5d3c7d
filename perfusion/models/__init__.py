"""Models: the base text-to-image UNet, the attribute classifier, and the personalization models built on them."""
