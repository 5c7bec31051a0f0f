//! The `sse-gateway` binary: parse settings, set up logs and metrics, run until a signal.

use std::process::ExitCode;

use clap::Parser;
use sse_gateway::config::{Cli, Command, Config, InspectArgs, LogFormat, Settings, TokenArgs};
use sse_gateway::{mint, Claims};

fn main() -> ExitCode {
    // One TLS implementation for the client port and rediss://: rustls with ring.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Some(Command::Inspect(args)) = &cli.command {
        return inspect(&cli.settings, args);
    }
    let log_format = cli.settings.log_format;
    let log_filter = cli.settings.log.clone();
    let config = match cli.settings.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sse-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Token(args)) = cli.command {
        return token(&config, args);
    }
    if let Err(e) = init_logs(log_format, &log_filter) {
        eprintln!("sse-gateway: invalid SSE_GATEWAY_LOG: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sse-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let exporter = match sse_gateway::Exporter::install() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("sse-gateway: {e}");
                return ExitCode::FAILURE;
            }
        };
        exporter.spawn_upkeep();
        match sse_gateway::run(config, Some(exporter), signals()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("sse-gateway: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn inspect(settings: &Settings, args: &InspectArgs) -> ExitCode {
    let Some(url) = settings.redis_url.as_deref().filter(|u| !u.is_empty()) else {
        eprintln!("sse-gateway inspect: set --redis-url (or SSE_GATEWAY_REDIS_URL) to the replicas' Redis");
        return ExitCode::from(2);
    };
    if args.user.is_none() && args.channel.is_none() {
        eprintln!("sse-gateway inspect: give --user <sub> and/or --channel <name>");
        return ExitCode::from(2);
    }
    let query = sse_gateway::inspect::Query {
        user: args.user.clone(),
        channel: args.channel.clone(),
        details: args.details,
        admin_token: settings.admin_token.clone().filter(|t| !t.is_empty()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sse-gateway inspect: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sse_gateway::inspect::run(
        url,
        &settings.channel_prefix,
        &query,
    )) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sse-gateway inspect: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(config: &Config, args: TokenArgs) -> ExitCode {
    if matches!(config.jwt_key, sse_gateway::config::JwtKey::Development(_)) {
        eprintln!("sse-gateway token: no key is configured; set SSE_GATEWAY_JWT_SECRET or SSE_GATEWAY_JWT_PUBLIC_KEY_FILE");
        return ExitCode::from(2);
    }
    if args.sub.is_none() && args.publish.is_empty() {
        eprintln!(
            "sse-gateway token: give --sub for a client token, or --publish for a publisher token"
        );
        return ExitCode::from(2);
    }
    let private = match &args.private_key_file {
        Some(p) => match std::fs::read(p) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!(
                    "sse-gateway token: cannot read --private-key-file {}: {e}",
                    p.display()
                );
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let claims = Claims {
        sub: args.sub,
        channels: (!args.channels.is_empty()).then_some(args.channels),
        publish: (!args.publish.is_empty()).then_some(args.publish),
        ..Claims::default()
    };
    match mint(config, claims, args.ttl, private.as_deref()) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sse-gateway token: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logs(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    }
    .map_err(|e| e.to_string())
}

/// Installs the SIGTERM and SIGINT handlers now, before the gateway says it is listening (a
/// signal that arrives right after must drain, not kill), and returns a future that completes
/// on the first of them; a second one exits at once.
fn signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!(
                "cannot install signal handlers; the gateway will only stop when killed"
            );
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown signal received; a second signal exits at once");
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::warn!("second signal: exiting without finishing the drain");
            std::process::exit(1);
        });
    }
}
