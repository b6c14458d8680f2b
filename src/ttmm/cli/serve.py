"""``ttmm serve``: the OpenAI-compatible server over a bank, run by uvicorn (or, with
``--ray``, by Ray Serve as replicas that each hold an engine: :mod:`ttmm.serve.ray`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ttmm.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    AdapterCacheOption,
    ApiKeyOption,
    BaseModelOption,
    DeviceOption,
    DtypeOption,
    EncoderOption,
    HostOption,
    LoraDtypeOption,
    PortOption,
    console,
    user_errors,
)

logger = logging.getLogger(__name__)


@user_errors
def serve(
    bank: Annotated[
        Path | None, typer.Option("--bank", "-b", help="Expert bank folder (or --rollout).")
    ] = None,
    rollout: Annotated[
        Path | None,
        typer.Option(
            help="Rollout file (YAML): serve its control and candidate arms side by side, "
            "measure them on live traffic, promote or roll back step by step."
        ),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            envvar="TTMM_ADMIN_KEY",
            help="Key of the rollout's operator endpoints (distinct from --api-key).",
            show_default=False,
        ),
    ] = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    base_model: BaseModelOption = None,
    encoder: EncoderOption = None,
    device: DeviceOption = DEFAULT_DEVICE,
    dtype: DtypeOption = DEFAULT_DTYPE,
    lora_dtype: LoraDtypeOption = "auto",
    adapter_cache_mb: AdapterCacheOption = None,
    pin_experts: Annotated[
        str | None,
        typer.Option(
            help="Expert ids kept in memory whatever the cache's use, e.g. '0,5,9' (with "
            "--adapter-cache-mb).",
            show_default=False,
        ),
    ] = None,
    api_key: ApiKeyOption = None,
    model_id: Annotated[str, typer.Option(help="Model name the server answers to.")] = "ttmm",
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 2048,
    max_tokens_limit: Annotated[
        int,
        typer.Option(
            "--max-tokens-limit", "--max-new-tokens", help="Largest max_tokens a request may ask."
        ),
    ] = 512,
    default_max_tokens: Annotated[
        int, typer.Option(help="Tokens generated when a request does not say.")
    ] = 128,
    max_concurrent: Annotated[
        int, typer.Option(help="Requests served at once; more get a 429.")
    ] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take (504 after).")] = 600.0,
    max_batch_size: Annotated[int, typer.Option(help="Most prompts generated together.")] = 8,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more requests, in ms.")
    ] = 50.0,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body in bytes; larger gets a 413.")
    ] = 1 << 20,
    max_streams: Annotated[
        int, typer.Option(help="Streamed completions served at once; more get a 429.")
    ] = 16,
    rate_limit: Annotated[
        int | None,
        typer.Option(help="Requests a minute per API key (or client address); default none."),
    ] = None,
    merge_cache_mb: Annotated[
        float, typer.Option(help="Memory for cached per-plan merge factors, in MiB (0: off).")
    ] = 1024.0,
    export_dir: Annotated[
        Path | None,
        typer.Option(help="Folder where /v1/ttmm/export writes adapters (default: send them)."),
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="Serve with Ray Serve, each replica its own engine.")
    ] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray).")] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join, e.g. 'auto' (default: start a local Ray)."),
    ] = None,
    autoscaling_config: Annotated[
        str | None,
        typer.Option(
            help="Ray Serve autoscaling options as JSON, e.g. "
            '\'{"min_replicas": 1, "max_replicas": 4}\' (with --ray; replaces --replicas).'
        ),
    ] = None,
) -> None:
    """Serve the bank over an OpenAI-compatible HTTP API that routes and merges per request."""
    import uvicorn

    from ttmm.device import resolve_lora_dtype
    from ttmm.model import TTMM
    from ttmm.serve.app import ServerSettings, create_app
    from ttmm.serve.rollout.config import RolloutConfig

    if (bank is None) == (rollout is None):
        raise ValueError("give --bank BANK, or --rollout FILE (which names its banks)")
    config = RolloutConfig.load(rollout) if rollout is not None else None

    settings = ServerSettings(
        model_id=model_id,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=default_max_tokens,
        max_concurrent_requests=max_concurrent,
        request_timeout_s=timeout,
        max_batch_size=max_batch_size,
        batch_window_ms=batch_window_ms,
        merge_cache_mb=merge_cache_mb,
        api_key=api_key,
        admin_key=admin_key,
        max_body_bytes=max_body_bytes,
        max_concurrent_streams=max_streams,
        rate_limit_per_minute=rate_limit,
        export_dir=str(export_dir) if export_dir is not None else None,
    )
    resolve_lora_dtype(lora_dtype)  # a typo is refused before Ray or a model starts
    if ray and pin_experts is not None:
        raise ValueError("--pin-experts serves one engine; leave it out with --ray")
    if ray:
        _serve_on_ray(
            bank if config is None else config.candidate.bank,
            settings,
            replicas,
            ray_address,
            autoscaling_config,
            host,
            port,
            {
                "base_model": base_model,
                "encoder": encoder,
                "device": device,
                "dtype": dtype,
                "lora_dtype": lora_dtype,
                "adapter_cache_mb": adapter_cache_mb,
            },
            rollout=config,
        )
        return
    if replicas != 1 or ray_address is not None or autoscaling_config is not None:
        raise ValueError("--replicas, --ray-address and --autoscaling-config need --ray")
    if config is not None:
        if pin_experts is not None:
            raise ValueError(
                "--pin-experts names one bank's experts (--bank); a rollout serves two: leave "
                "it out with --rollout"
            )
        _serve_rollout(
            config, settings, host, port, base_model, encoder, device, dtype, lora_dtype,
            adapter_cache_mb,
        )  # fmt: skip
        return
    with console.status("loading base model, encoder and bank"):
        engine = TTMM.from_bank(
            Path(bank),
            base_model=base_model,
            encoder=encoder,
            device=device,
            dtype=dtype,
            lora_dtype=lora_dtype,
            adapter_cache_mb=adapter_cache_mb,
        )
        if pin_experts:
            engine.pin_experts(_expert_ids(pin_experts))
    _warn_if_open(host, api_key)
    console.print(
        f"serving {settings.model_id!r} ({engine.bank.num_experts} experts, "
        f"{engine.device}, {engine.model.dtype}) on http://{host}:{port}"
    )
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info")


def _serve_rollout(
    config, settings, host, port, base_model, encoder, device, dtype, lora_dtype, adapter_cache_mb
):
    import uvicorn

    from ttmm.serve.app import create_app
    from ttmm.serve.rollout.service import start_rollout

    with console.status("loading base model, encoder and both arms"):
        rollout = start_rollout(
            config, base_model, encoder, device, dtype, lora_dtype,
            adapter_cache_mb=adapter_cache_mb,
        )  # fmt: skip
    _warn_if_open(host, settings.api_key)
    status = rollout.controller.status(decisions=0)
    console.print(
        f"serving {settings.model_id!r}: rollout {status['rollout_id']} ({config.mode}), "
        f"control {config.control.kind}, candidate {config.candidate.bank}, step "
        f"{status['step'] + 1}/{len(config.steps)} at {status['share']['candidate']:g} %, "
        f"{status['status']}; on http://{host}:{port}"
    )
    if settings.admin_key is None:
        logger.warning("no --admin-key: the rollout runs, but operators cannot act over HTTP")
    uvicorn.run(create_app(None, settings, rollout), host=host, port=port, log_level="info")


def _warn_if_open(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it may use it", host)


def _serve_on_ray(
    bank, settings, replicas, address, autoscaling, host, port, engine_options, rollout=None
):
    from ttmm.serve.ray import RayServeConfig, serve_until_interrupted

    config = RayServeConfig.from_options(
        replicas, address, autoscaling, engine_options["device"], host, port
    )
    _warn_if_open(host, settings.api_key)
    count = "autoscaled" if config.autoscaling_config is not None else str(config.replicas)
    console.print(
        f"serving {settings.model_id!r} on Ray Serve ({count} replicas, each loading the bank) "
        f"on http://{host}:{port}; Ctrl-C stops it"
    )
    serve_until_interrupted(bank, engine_options, settings, config, rollout)


def _expert_ids(text: str) -> list[int]:
    """'0,5,9' → [0, 5, 9], with a clear error for anything else."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--pin-experts {text!r}: give expert ids separated by commas, e.g. 0,5,9"
        ) from None
