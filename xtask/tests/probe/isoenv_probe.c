/* isoenv's isolation probes: what native code run by a database superuser (an untrusted
 * extension) would try. Each function attempts one escape and says, in words, what happened.
 * Built by xtask/tests/isolation.rs against the installed server's headers. */
#define _GNU_SOURCE
#include "postgres.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

PG_MODULE_MAGIC;

static text *say(const char *what, int err)
{
    char buf[256];
    if (err)
        snprintf(buf, sizeof buf, "%s: %s", what, strerror(err));
    else
        snprintf(buf, sizeof buf, "%s", what);
    return cstring_to_text(buf);
}

/* Takes this backend's client connection (a socket of the host's network when the server got
 * its port handed over) and points it at 127.0.0.1:port. */
PG_FUNCTION_INFO_V1(isoenv_probe_reconnect);
Datum isoenv_probe_reconnect(PG_FUNCTION_ARGS)
{
    int port = PG_GETARG_INT32(0);
    for (int fd = 0; fd < 1024; fd++) {
        struct sockaddr_in self;
        socklen_t len = sizeof self;
        int type = 0;
        socklen_t tlen = sizeof type;
        if (getsockname(fd, (struct sockaddr *) &self, &len) != 0 || self.sin_family != AF_INET)
            continue;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM)
            continue;
        struct sockaddr unspec = {.sa_family = AF_UNSPEC};
        if (connect(fd, &unspec, sizeof unspec) != 0)
            PG_RETURN_TEXT_P(say("disconnect refused", errno));
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
        to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *) &to, sizeof to) != 0)
            PG_RETURN_TEXT_P(say("connect refused", errno));
        PG_RETURN_TEXT_P(say("connected", 0));
    }
    PG_RETURN_TEXT_P(say("no inet socket", 0));
}

/* In a child (so this backend stays as it is): a new user namespace. */
PG_FUNCTION_INFO_V1(isoenv_probe_userns);
Datum isoenv_probe_userns(PG_FUNCTION_ARGS)
{
    pid_t child = fork();
    if (child == 0)
        _exit(unshare(CLONE_NEWUSER) == 0 ? 0 : errno);
    int status = 0;
    waitpid(child, &status, 0);
    int err = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    PG_RETURN_TEXT_P(err == 0 ? say("created", 0) : say("refused", err));
}

/* The session keyring: whether a key named by the argument is in it. */
PG_FUNCTION_INFO_V1(isoenv_probe_key);
Datum isoenv_probe_key(PG_FUNCTION_ARGS)
{
    char *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
    /* KEYCTL_SEARCH = 10, KEY_SPEC_SESSION_KEYRING = -3 */
    long id = syscall(SYS_keyctl, 10, -3, "user", name, 0);
    PG_RETURN_TEXT_P(id >= 0 ? say("found", 0) : say("not found", errno));
}

/* Every descriptor this backend holds beyond stdio, as /proc says where it points. */
PG_FUNCTION_INFO_V1(isoenv_probe_fds);
Datum isoenv_probe_fds(PG_FUNCTION_ARGS)
{
    StringInfoData out;
    initStringInfo(&out);
    for (int fd = 3; fd < 1024; fd++) {
        char link[64], target[1024];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n < 0)
            continue;
        target[n] = 0;
        appendStringInfo(&out, "%d=%s\n", fd, target);
    }
    PG_RETURN_TEXT_P(cstring_to_text(out.data));
}
