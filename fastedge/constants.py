"""Hard-concrete constants (docs/CONCEPTS.md section 3; Louizos, Welling and Kingma 2018)."""
import math

BETA = 2.0 / 3.0          # temperature
LIMIT_LEFT = -0.1         # stretch interval (l, r)
LIMIT_RIGHT = 1.1
EPS = 1e-6                # noise clamp: u in [EPS, 1 - EPS]
DETERMINISTIC_SCALE = 0.8 # evaluation mask: sigmoid(0.8 * log_alpha / BETA)
INIT_MEAN = 10.0          # log_alpha ~ N(INIT_MEAN, INIT_STD): every mask starts at 1
INIT_STD = 0.01

# P(z != 0) = sigmoid(log_alpha - L0_SHIFT)
L0_SHIFT = BETA * math.log(-LIMIT_LEFT / LIMIT_RIGHT)
