"""Models: one architecture per file; the registry maps `--arch` names to (model class, config class).

Next-item models (SASRec, HSTU) rank every item after a history; CTR models (SIM, ETA, SDIM, TWIN and the
no-history baseline) score one candidate per sample. `TASKS` says which is which."""
from ckv_cli.models.base import KVCache, SequentialRecommender, last_hidden
from ckv_cli.models.eta import ETA, ETAConfig
from ckv_cli.models.hstu import HSTU, HSTUConfig
from ckv_cli.models.nohistory import NoHistory, NoHistoryConfig
from ckv_cli.models.sasrec import SASRec, SASRecConfig
from ckv_cli.models.sdim import SDIM, SDIMConfig
from ckv_cli.models.sim import SIM, SIMConfig
from ckv_cli.models.target_attention import CTRCache, CTRModel
from ckv_cli.models.twin import TWIN, TWINConfig

REGISTRY = {"sasrec": (SASRec, SASRecConfig), "hstu": (HSTU, HSTUConfig),
            "sim": (SIM, SIMConfig), "eta": (ETA, ETAConfig), "sdim": (SDIM, SDIMConfig), "twin": (TWIN, TWINConfig),
            "nohistory": (NoHistory, NoHistoryConfig)}
TASKS = {"sasrec": "next-item", "hstu": "next-item", "sim": "ctr", "eta": "ctr", "sdim": "ctr", "twin": "ctr",
         "nohistory": "ctr"}

__all__ = ["CTRCache", "CTRModel", "ETA", "HSTU", "HSTUConfig", "KVCache", "NoHistory", "REGISTRY", "SASRec",
           "SASRecConfig", "SDIM", "SIM", "SequentialRecommender", "TASKS", "TWIN", "last_hidden"]
