"""Numbers reported by the paper (Table 2, ImageNet-1k, 224x224), for comparison only."""

# variant: (params in M, FLOPs in G as multiply-adds, top-1 %, top-5 %)
TABLE2 = {
    'epsanet50_small': (22.56, 3.62, 77.49, 93.54),
    'epsanet50_large': (27.90, 4.72, 78.64, 94.18),
    'epsanet101_small': (38.90, 6.82, 78.43, 94.11),
    'epsanet101_large': (49.59, 8.97, 79.38, 94.58),
}
