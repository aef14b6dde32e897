"""Keep patient data out of logs.

pydicom and highdicom report odd header values by quoting them, as warnings (``The string
"DOE^JANE" is unlikely…``) and through their loggers (pydicom's ``warn_and_log``): patient data
that must never reach a log, whatever handlers a deployment adds. Their warnings are dropped and
their loggers disabled; what the service notices about an image goes into the answer's notes.
"""

from __future__ import annotations

import logging
import warnings

QUOTING_LIBRARIES = ("pydicom", "highdicom")


def keep_patient_data_out_of_logs() -> None:
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\.|$)")
    for name in QUOTING_LIBRARIES:
        logging.getLogger(name).disabled = True
