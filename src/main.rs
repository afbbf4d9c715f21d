//! The `agentid` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use agentid::cli::{
    AuditCommand, BundleCommand, Cli, Command, JwtCommand, LogFormat, ServerCaCommand,
    ServerSubcommand, ServerTokenCommand, TokenCommand, X509Command,
};
use agentid::{bench, commands, up};
use clap::Parser;

/// Exit code for configuration errors (EX_CONFIG is 78; 64 is EX_USAGE, what DESIGN.md asks).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentid: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("agentid: configuration error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("agentid: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Up(args) => {
            let config = up::UpConfig {
                trust_domain: args.trust_domain,
                state_dir: args
                    .state_dir
                    .unwrap_or_else(agentid::cli::default_state_dir),
                socket: args.socket.unwrap_or_else(agentid::cli::default_socket),
                policy: args.policy,
                admin_addr: args.admin_addr,
                admin_allow_remote: args.admin_allow_remote,
                rehash_interval: args.rehash_interval,
                k8s: args.k8s.config(),
                authority: args.rotation.config(),
            };
            tracing::info!(config = ?config, "starting agentid up");
            let up = up::build(config).await.map_err(config_or_other)?;
            print!("{}", up.banner());
            use std::io::Write;
            let _ = std::io::stdout().flush();
            up.serve(shutdown_signal()).await?;
            tracing::info!("agentid up stopped");
            Ok(())
        }
        Command::Server(cmd) => match cmd.command {
            None => {
                let config = commands::cluster::server_config(cmd.run).map_err(Failure::Config)?;
                tracing::info!(config = ?config, "starting agentid server");
                let server = commands::cluster::server_build(config)
                    .await
                    .map_err(config_or_other)?;
                server.serve(shutdown_signal()).await?;
                tracing::info!("agentid server stopped");
                Ok(())
            }
            Some(ServerSubcommand::Token(ServerTokenCommand::Create {
                admin,
                ttl,
                node_name,
            })) => Ok(commands::cluster::token_create(&admin.admin_socket, ttl, node_name).await?),
            Some(ServerSubcommand::Ca(ServerCaCommand::Rotate { admin, now })) => {
                Ok(commands::cluster::ca_rotate(&admin.admin_socket, now).await?)
            }
        },
        Command::Node(args) => {
            let config = commands::cluster::node_config(*args).map_err(Failure::Config)?;
            tracing::info!(config = ?config, "starting agentid node");
            let node = commands::cluster::node_build(config)
                .await
                .map_err(config_or_other)?;
            node.serve(shutdown_signal()).await?;
            tracing::info!("agentid node stopped");
            Ok(())
        }
        Command::Bundle(BundleCommand::Export {
            store,
            admin_socket,
        }) => Ok(commands::cluster::bundle_export(store, admin_socket).await?),
        Command::X509(X509Command::Watch { client }) => Ok(commands::x509_watch(client).await?),
        Command::X509(X509Command::Fetch { client, out }) => {
            Ok(commands::x509_fetch(client, out.as_deref()).await?)
        }
        Command::X509(X509Command::Inspect { input, json }) => {
            Ok(commands::x509_inspect(&input, json)?)
        }
        Command::Jwt(JwtCommand::Inspect { token, json }) => {
            Ok(commands::jwt_inspect(&token, json)?)
        }
        Command::Jwt(JwtCommand::Fetch {
            client,
            audience,
            spiffe_id,
        }) => Ok(commands::jwt_fetch(client, audience, spiffe_id).await?),
        Command::Jwt(JwtCommand::Validate {
            client,
            audience,
            token,
        }) => Ok(commands::jwt_validate(client, audience, token).await?),
        Command::Token(TokenCommand::Mint(args)) => Ok(commands::token::mint(args).await?),
        Command::Token(TokenCommand::Delegate(args)) => Ok(commands::token::delegate(args).await?),
        Command::Token(TokenCommand::Verify {
            client,
            audience,
            presenter,
            bundle,
            token,
        }) => Ok(
            commands::token::verify(client, audience, presenter, bundle.as_deref(), token).await?,
        ),
        Command::Bundle(BundleCommand::Show { client }) => Ok(commands::bundle_show(client).await?),
        Command::Audit(AuditCommand::Verify { file, any_start }) => {
            Ok(commands::audit_verify(&file, any_start)?)
        }
        Command::Bench(args) => Ok(bench::run(args).await?),
        Command::BenchFloor { socket, spin } => {
            Ok(bench::floor::serve(&socket, spin.unwrap_or_default(), shutdown_signal()).await?)
        }
    }
}

/// A bad policy file or Kubernetes setting is a configuration error (exit 64).
fn config_or_other(e: anyhow::Error) -> Failure {
    let config = e.chain().any(|c| {
        c.downcast_ref::<agentid::policy::PolicyError>().is_some()
            || c.downcast_ref::<agentid::node::k8s::K8sConfigError>()
                .is_some()
            || c.downcast_ref::<agentid::server::AuthorityConfigError>()
                .is_some()
            || c.downcast_ref::<agentid::server::cluster::ClusterConfigError>()
                .is_some()
    });
    if config {
        Failure::Config(e)
    } else {
        Failure::Other(e)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
