"""The SparkSession (local Delta or the cluster's) and MLflow, configured from Settings."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from restpg.config import Settings


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def tpu_present() -> bool:
    return any(k in os.environ for k in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")) or Path("/dev/accel0").exists()


def default_pjrt_device() -> None:
    """PJRT_DEVICE=CPU when unset and no TPU is here: torch-xla's own choice, without its warning on import."""
    if "PJRT_DEVICE" not in os.environ and not tpu_present():
        os.environ["PJRT_DEVICE"] = "CPU"


# Settings the libraries read from the environment, so Spark's Python workers, started with the driver's
# environment, are as quiet as the driver; a value already set wins.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars too
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "TQDM_DISABLE": "1",
    "RESTPG_QUIET_JVM_START": "1",  # get_spark: Spark's dependency resolution report at JVM start left out
}
# MLflow's advice when a pyfunc is logged (in the driver; the messages start with a colour code)
QUIET_WARNINGS = ("Add type hints to the `predict` method", "An input example was not provided")


def quiet_third_party() -> None:
    """Turn off third-party progress bars, advice and warnings (`restpg --verbose` keeps them); restpg's own
    progress lines are untouched. Call before Spark starts and before transformers, MLflow or torch-xla load."""
    import logging
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    default_pjrt_device()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    show = warnings.showwarning
    if not getattr(show, "restpg_quiet", False):
        # not a filter: MLflow logs models under its own "once" filter for UserWarning, which comes first
        def showwarning(message, category, *args, **kwargs):
            if not any(text in str(message) for text in QUIET_WARNINGS):
                show(message, category, *args, **kwargs)

        showwarning.restpg_quiet = True
        warnings.showwarning = showwarning


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc `malloc_trim`): a training job's
    freed tensors otherwise stay in the driver's resident memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# What Spark's JVM prints on stderr at every local start and nobody reads: the dependency resolution of
# `spark.jars.packages` (Ivy, ~45 lines from ":: loading settings" or "Ivy Default Cache" to "N artifacts
# copied") and start-up notices. Everything else it prints (warnings, errors, stack traces) passes through.
_IVY_START = re.compile(r"^(:: loading settings :: |Ivy Default Cache set to)")
_IVY_END = re.compile(r"\d+ artifacts copied, \d+ already retrieved")
_LOG_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d ")
_NOTICES = re.compile(r"^(WARNING: Using incubator modules|Using Spark's default log4j profile|Setting default log level to"
                      r"|To adjust logging level use sc\.setLogLevel)|WARN NativeCodeLoader: Unable to load native-hadoop")


def _forward_jvm_stderr(read_fd: int, swallowed: list[str]) -> None:
    """Copy the JVM's stderr to ours line by line, leaving out Ivy's resolution report and the start-up
    notices (kept in `swallowed`, printed if the JVM fails to start)."""
    in_ivy = False
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace")
            if not in_ivy and _IVY_START.search(line):
                in_ivy = True
            if in_ivy and _LOG_LINE.search(line):  # Spark logging again: the report is over (or broke off)
                in_ivy = False
            if in_ivy or _NOTICES.search(line):
                swallowed.append(line)
                if _IVY_END.search(line):
                    in_ivy = False
                continue
            try:
                os.write(2, raw)
            except OSError:  # our stderr is gone: keep draining, or the JVM would block on a full pipe
                pass


def _launch_jvm_quietly(options: dict) -> None:
    """Start the local driver's JVM (as `getOrCreate` would, with the same configuration) with its stderr
    read through `_forward_jvm_stderr`, so a run's console starts with its own lines. A JVM that fails to
    start shows everything it printed. Only where `quiet_third_party` ran (not `--verbose`); no-op when a
    JVM is already up or PySpark was given one."""
    import threading

    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if (SparkContext._gateway is not None or "PYSPARK_GATEWAY_PORT" in os.environ
            or os.environ.get("RESTPG_QUIET_JVM_START") != "1"):
        return
    read_fd, write_fd = os.pipe()
    swallowed: list[str] = []
    reader = threading.Thread(target=_forward_jvm_stderr, args=(read_fd, swallowed), name="jvm-stderr", daemon=True)
    reader.start()
    try:
        gateway = launch_gateway(SparkConf().setAll(list(options.items())), popen_kwargs={"stderr": write_fd})
    except Exception:
        os.close(write_fd)
        reader.join(timeout=10)  # the JVM is gone: the reader ends at the pipe's end, with its last lines
        sys.stderr.write("".join(swallowed))
        raise
    os.close(write_fd)  # the JVM holds its own copy
    SparkContext._ensure_initialized(gateway=gateway)


def get_spark(settings: Settings):
    """The cluster's session on Databricks; locally `local[*]` with Delta, warehouse under the home."""
    from pyspark.sql import SparkSession

    if on_databricks():
        spark = SparkSession.builder.getOrCreate()
    else:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        from delta import configure_spark_with_delta_pip

        home = settings.home_dir
        home.mkdir(parents=True, exist_ok=True)
        builder = (
            SparkSession.builder.master(settings.spark.master)
            .appName("restpg")
            .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
            .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
            .config("spark.sql.warehouse.dir", str(home / "warehouse"))
            .config("spark.driver.memory", settings.spark.driver_memory)
            .config("spark.sql.shuffle.partitions", str(settings.spark.shuffle_partitions))
            .config("spark.sql.adaptive.enabled", str(settings.spark.adaptive).lower())
            .config("spark.sql.codegen.wholeStage", str(settings.spark.codegen).lower())
            .config("spark.sql.codegen.factoryMode", "FALLBACK" if settings.spark.codegen else "NO_CODEGEN")
            .config("spark.default.parallelism", str(settings.spark.shuffle_partitions))
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.python.worker.reuse", "true")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.databricks.delta.snapshotPartitions", "2")
            .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={home / 'derby'}")
        )
        builder = configure_spark_with_delta_pip(builder)
        _launch_jvm_quietly(dict(builder._options))
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel(settings.spark.log_level)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.spark.arrow_batch_rows))
    from restpg import catalog

    catalog.register_tables(spark, settings)
    return spark


def mlflow_uris(settings: Settings) -> tuple[str, str]:
    """(tracking URI, registry URI): the profile's, or a SQLite file under the home directory."""
    tracking = settings.mlflow.tracking_uri or f"sqlite:///{settings.home_dir / 'mlflow.db'}"
    return tracking, settings.mlflow.registry_uri or tracking


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or written: nothing has been run."""


def check_tracking(settings: Settings) -> None:
    """Fail in seconds, before any work, when the tracking store is unusable: an HTTP server that does
    not accept connections (MLflow's own client would retry for minutes) or a SQLite file whose
    directory cannot be created or written. Other schemes (databricks, ...) are left to MLflow."""
    import socket
    from urllib.parse import urlparse

    tracking, _ = mlflow_uris(settings)
    uri = urlparse(tracking)
    if uri.scheme in ("http", "https"):
        port = uri.port or (443 if uri.scheme == "https" else 80)
        try:
            socket.create_connection((uri.hostname, port), timeout=5).close()
        except OSError as e:
            raise TrackingUnavailable(f"MLflow tracking server {tracking} is unreachable ({e.strerror or e}); "
                                      "start it or set mlflow.tracking_uri") from e
    elif uri.scheme == "sqlite":
        db = Path(tracking.removeprefix("sqlite:///"))
        folder = next((p for p in (db.parent, *db.parent.parents) if p.exists()), None)
        if (db.exists() and not os.access(db, os.W_OK)) or folder is None or not folder.is_dir() \
                or not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingUnavailable(f"MLflow tracking store {tracking} cannot be written ({folder} is not a writable "
                                      "directory); set mlflow.tracking_uri or the home directory")


def setup_mlflow(settings: Settings) -> str:
    """Point MLflow at the profile's tracking server (local SQLite by default); returns experiment id."""
    import mlflow

    check_tracking(settings)
    home = settings.home_dir
    tracking, registry = mlflow_uris(settings)
    if tracking.startswith("sqlite:"):
        home.mkdir(parents=True, exist_ok=True)
        Path(tracking.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)
    exp = mlflow.get_experiment_by_name(settings.mlflow.experiment)
    if exp is None:
        location = None if on_databricks() or not tracking.startswith("sqlite:") else (home / "mlruns").as_uri()
        return mlflow.create_experiment(settings.mlflow.experiment, artifact_location=location)
    mlflow.set_experiment(settings.mlflow.experiment)
    return exp.experiment_id
