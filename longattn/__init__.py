"""longattn: rewrite softmax attention in traced models into long-context kernels."""
