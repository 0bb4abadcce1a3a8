"""Where the examples find DTM and the bank service when run on their own."""

from __future__ import annotations

import os

DTM = os.environ.get("DTM_SERVER", "http://localhost:36789/api/dtmsvr")
BUSI = os.environ.get("BANK_URL", "http://localhost:8081/api/busi")
