"""Write sp500_returns.csv: standardised daily log returns of the S&P 500, 2017-2018.

    pip install 'gradcal[examples]'      # the arch package, which ships the price series
    python prepare_data.py

The prices are the S&P 500 daily closes bundled with ``arch`` (arch.data.sp500). Returns
are divided by their standard deviation: Rama Cont's returns live on the scale 1/eta, so
the model calibrates the shape of the return distribution and its dependence, with eta
carrying the scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from arch.data import sp500


def main() -> None:
    close = sp500.load()["Adj Close"]
    returns = np.diff(np.log(close.to_numpy()))[-500:]  # the last 500 trading days of 2017-2018
    standardised = (returns - returns.mean()) / returns.std()
    out = Path(__file__).with_name("sp500_returns.csv")
    with open(out, "w") as f:
        f.write("day,return\n")
        for day, value in enumerate(standardised):
            f.write(f"{day},{value:.8f}\n")
    print(f"wrote {out}: {len(standardised)} returns, raw sd {returns.std():.5f}")


if __name__ == "__main__":
    main()
