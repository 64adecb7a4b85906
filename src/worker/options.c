/*-------------------------------------------------------------------------
 *
 * options.c
 *		jobloop-worker's command line.
 *
 * Only what belongs to the machine the program runs on is an option: the
 * connection, the TLS files the calls present or trust, the name it goes
 * by.  Everything that decides what calls may do (allowed_hosts, sizes,
 * redirects) is the server's, and comes with the replies.
 *
 *-------------------------------------------------------------------------
 */
#include "worker.h"

#include <getopt.h>
#include <unistd.h>

#define DEFAULT_TURN_TIMEOUT_S	60
#define DEFAULT_MAX_RESULTS		1000

WorkerOptions worker_options;

static void
usage(FILE *out)
{
	fprintf(out,
			"jobloop-worker runs jobloop's HTTP calls on this machine for a PostgreSQL server.\n"
			"\n"
			"Usage:\n"
			"  jobloop-worker [OPTION]... CONNINFO\n"
			"\n"
			"CONNINFO is a libpq connection string or URI, e.g.\n"
			"  'host=db.internal dbname=app user=worker1'\n"
			"The role must be a member of jobloop_worker.\n"
			"\n"
			"Options:\n"
			"  --ca-file=FILE        CA certificates (PEM) that HTTPS calls trust;\n"
			"                        default: libcurl's bundle\n"
			"  --client-cert=FILE    client certificate (PEM) for servers that ask for one\n"
			"  --client-key=FILE     its private key (unencrypted PEM)\n"
			"  --name=NAME           the name the server shows for this worker\n"
			"                        (default: the host name)\n"
			"  --turn-timeout=SECS   a turn unanswered this long counts as a lost\n"
			"                        connection (default: %d)\n"
			"  -v, --verbose         log DEBUG lines too\n"
			"  -V, --version         print the version and exit\n"
			"  -?, --help            show this help and exit\n"
			"\n"
			"It logs to stderr, reconnects with backoff when the connection is lost, and\n"
			"stops on SIGTERM or SIGINT, after which the server frees its jobs at once.\n",
			DEFAULT_TURN_TIMEOUT_S);
}

static void
bad_usage(const char *fmt, const char *arg)
{
	fprintf(stderr, "jobloop-worker: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\nTry \"jobloop-worker --help\" for more information.\n");
	exit(1);
}

/* A readable file, or "" for none: checked now rather than at every HTTPS call. */
static const char *
file_option(const char *name, const char *path)
{
	if (path[0] != '\0' && access(path, R_OK) != 0)
	{
		fprintf(stderr, "jobloop-worker: %s \"%s\" cannot be read: %s\n", name, path, strerror(errno));
		exit(1);
	}
	return path;
}

static const char *
host_name(void)
{
	static char name[256];

	if (gethostname(name, sizeof(name)) != 0)
		return "unknown";
	name[sizeof(name) - 1] = '\0';
	return name;
}

void
options_parse(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"ca-file", required_argument, NULL, 1},
		{"client-cert", required_argument, NULL, 2},
		{"client-key", required_argument, NULL, 3},
		{"name", required_argument, NULL, 4},
		{"turn-timeout", required_argument, NULL, 5},
		{"verbose", no_argument, NULL, 'v'},
		{"version", no_argument, NULL, 'V'},
		{"help", no_argument, NULL, 6},
		{NULL, 0, NULL, 0}
	};
	int			c;
	char	   *end;
	long		n;

	worker_options.ca_file = "";
	worker_options.client_cert = "";
	worker_options.client_key = "";
	worker_options.name = NULL;
	worker_options.turn_timeout_s = DEFAULT_TURN_TIMEOUT_S;
	worker_options.max_results = DEFAULT_MAX_RESULTS;

	/* as PostgreSQL's programs: "-?" is help, whatever getopt makes of it */
	for (int i = 1; i < argc; i++)
		if (strcmp(argv[i], "-?") == 0)
		{
			usage(stdout);
			exit(0);
		}
	/* getopt's own message for an unknown option would not say how to get help */
	opterr = 0;
	while ((c = getopt_long(argc, argv, "vV", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case 1:
				worker_options.ca_file = file_option("--ca-file", optarg);
				break;
			case 2:
				worker_options.client_cert = file_option("--client-cert", optarg);
				break;
			case 3:
				worker_options.client_key = file_option("--client-key", optarg);
				break;
			case 4:
				if (optarg[0] == '\0' || strlen(optarg) > 63)
					bad_usage("--name must have 1 to 63 characters, not \"%s\"", optarg);
				worker_options.name = optarg;
				break;
			case 5:
				errno = 0;
				n = strtol(optarg, &end, 10);
				if (errno != 0 || *end != '\0' || end == optarg || n < 1 || n > 86400)
					bad_usage("--turn-timeout must be a number of seconds from 1 to 86400, not \"%s\"",
							  optarg);
				worker_options.turn_timeout_s = (int) n;
				break;
			case 'v':
				worker_log_debug = true;
				break;
			case 'V':
				printf("jobloop-worker %s\n", JOBLOOP_ENGINE_VERSION);
				exit(0);
			case 6:
				usage(stdout);
				exit(0);
			default:
				bad_usage("option \"%s\" is unknown or needs a value", argv[optind - 1]);
		}
	}
	if (worker_options.client_key[0] != '\0' && worker_options.client_cert[0] == '\0')
		bad_usage("%s", "--client-key needs --client-cert");
	if (optind != argc - 1)
		bad_usage("%s", optind >= argc ? "a connection string (CONNINFO) is needed"
				  : "one connection string (CONNINFO) only; quote it");
	worker_options.conninfo = argv[optind];
	if (worker_options.name == NULL)
	{
		worker_options.name = host_name();
		/* the server keeps 63 bytes of it */
		if (strlen(worker_options.name) > 63)
			worker_options.name = pnstrdup(worker_options.name, 63);
	}
}
