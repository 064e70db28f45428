// pgjdbc check program for the egressproxy driver matrix.
//
// It connects with the PostgreSQL JDBC driver (pgjdbc) to --port (normally
// one of the proxy's listeners in front of a real PostgreSQL that wants SCRAM
// over TLS) and runs a fixed checklist. The contract, shared with every driver
// script (see ../README.md):
//
//   java [-Djdk.net.hosts.file=FILE] -cp DIR:/usr/share/java/postgresql.jar PgCheck
//       --addr IP --port N --host NAME --tls verify-full|disable --ca PATH
//       --dbname D --user U --password P [--checks a,b]
//
//   --tls verify-full: TLS from the driver, chain checked against --ca, name
//     against --host, SNI --host.  pgjdbc has no libpq-style hostaddr, so the
//     URL names --host and the JVM must resolve it to --addr: run it with
//     -Djdk.net.hosts.file=FILE where FILE holds the line "ADDR NAME".  This
//     program refuses to connect when --host does not resolve to --addr.
//   --tls disable: plaintext to --addr (the proxy originates TLS upstream);
//     --ca is ignored and no hosts file is needed.
//   Output: one JSON object per line on stdout, one per check, in the order
//     of CHECKS below: {"check", "ok", "detail", "seconds"}.  Nothing else
//     goes to stdout; diagnostics go to stderr.
//   Exit code: 0 iff every check was ok, 1 otherwise, 2 for bad arguments.
//   Each check catches its own errors and is cut off after CHECK_TIMEOUT_S;
//   once RUN_BUDGET_S has gone by, the checks left fail without running.

import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetAddress;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.SecureRandom;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public final class PgCheck {
    static final int CHECK_TIMEOUT_S = 20;
    static final int RUN_BUDGET_S = 45;
    static final int CONNECT_TIMEOUT_S = 5;
    static final int SOCKET_TIMEOUT_S = 25;
    static final int NOTIFY_WAIT_MS = 5000;
    static final int CANCEL_AFTER_MS = 500;
    static final int CANCEL_WAIT_MS = 5000;
    static final int COPY_ROWS = 20000;

    static final List<String> REQUIRED =
            List.of("addr", "port", "host", "tls", "ca", "dbname", "user", "password");

    /** A check: opens its connections through the Scope, returns its detail or throws. */
    interface Check {
        String run(Scope scope) throws Exception;
    }

    static final class UsageError extends Exception {
        private static final long serialVersionUID = 1L;

        UsageError(String message) {
            super(message);
        }
    }

    /** The parsed command line. */
    static final class Options {
        String addr;
        int port;
        String host;
        String tls;
        String ca;
        String dbname;
        String user;
        String password;
        List<String> checks;

        boolean verifyFull() {
            return tls.equals("verify-full");
        }
    }

    // The JSON lines are the only thing on stdout: keep the real stdout here
    // and point System.out at stderr, so stray prints cannot break the output.
    static final PrintStream RESULTS = new PrintStream(
            new java.io.FileOutputStream(java.io.FileDescriptor.out), true, StandardCharsets.UTF_8);

    static Options options;
    static final Map<String, Check> CHECKS = new LinkedHashMap<>();

    static {
        CHECKS.put("connect", PgCheck::checkConnect);
        CHECKS.put("simple_query", PgCheck::checkSimpleQuery);
        CHECKS.put("extended_query", PgCheck::checkExtendedQuery);
        CHECKS.put("prepared", PgCheck::checkPrepared);
        CHECKS.put("copy", PgCheck::checkCopy);
        CHECKS.put("listen_notify", PgCheck::checkListenNotify);
        CHECKS.put("cancel", PgCheck::checkCancel);
        CHECKS.put("wrong_password", PgCheck::checkWrongPassword);
    }

    public static void main(String[] args) {
        System.setOut(System.err);
        try {
            options = parseOptions(args);
        } catch (UsageError e) {
            log("usage error: " + e.getMessage());
            System.exit(2);
        }
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(RUN_BUDGET_S);
        boolean allOk = true;
        for (String name : options.checks) {
            allOk &= runCheck(name, deadline);
        }
        RESULTS.flush();
        // Exit at once: a check cut off by its timeout may leave a thread behind.
        System.exit(allOk ? 0 : 1);
    }

    // -------------------------------------------------------------------------
    // Arguments

    static Options parseOptions(String[] args) throws UsageError {
        Map<String, String> values = new HashMap<>();
        for (int i = 0; i < args.length; i += 2) {
            String flag = args[i];
            if (!flag.startsWith("--") || i + 1 >= args.length) {
                throw new UsageError("expected --name value pairs, got " + flag);
            }
            String name = flag.substring(2);
            if (!REQUIRED.contains(name) && !name.equals("checks")) {
                throw new UsageError("unknown option " + flag);
            }
            values.put(name, args[i + 1]);
        }
        List<String> missing = new ArrayList<>();
        for (String name : REQUIRED) {
            if (!values.containsKey(name)) {
                missing.add("--" + name);
            }
        }
        if (!missing.isEmpty()) {
            throw new UsageError("missing " + String.join(", ", missing));
        }
        Options o = new Options();
        o.addr = values.get("addr");
        o.host = values.get("host");
        o.tls = values.get("tls");
        o.ca = values.get("ca");
        o.dbname = values.get("dbname");
        o.user = values.get("user");
        o.password = values.get("password");
        if (!o.tls.equals("verify-full") && !o.tls.equals("disable")) {
            throw new UsageError("--tls must be verify-full or disable, not " + o.tls);
        }
        try {
            o.port = Integer.parseInt(values.get("port"));
        } catch (NumberFormatException e) {
            o.port = -1;
        }
        if (o.port < 1 || o.port > 65535) {
            throw new UsageError("--port must be a TCP port, not " + values.get("port"));
        }
        o.checks = selectChecks(values.get("checks"));
        return o;
    }

    /** The checks to run, always in the contract's order. */
    static List<String> selectChecks(String list) throws UsageError {
        if (list == null || list.isBlank()) {
            return new ArrayList<>(CHECKS.keySet());
        }
        List<String> wanted = new ArrayList<>();
        for (String name : list.split(",")) {
            String trimmed = name.trim();
            if (trimmed.isEmpty()) {
                continue;
            }
            if (!CHECKS.containsKey(trimmed)) {
                throw new UsageError("unknown check " + trimmed);
            }
            wanted.add(trimmed);
        }
        List<String> ordered = new ArrayList<>();
        for (String name : CHECKS.keySet()) {
            if (wanted.contains(name)) {
                ordered.add(name);
            }
        }
        return ordered;
    }

    // -------------------------------------------------------------------------
    // Connections

    /**
     * The JDBC URL for the contract's --tls modes. verify-full names --host, which
     * the JVM resolves to --addr through -Djdk.net.hosts.file; pgjdbc verifies the
     * certificate against that name and the JDK sends it as SNI.
     */
    static String url() {
        Options o = options;
        if (o.verifyFull()) {
            return "jdbc:postgresql://" + o.host + ":" + o.port + "/" + encode(o.dbname)
                    + "?sslmode=verify-full&sslrootcert=" + encode(o.ca);
        }
        return "jdbc:postgresql://" + hostInUrl(o.addr) + ":" + o.port + "/" + encode(o.dbname)
                + "?sslmode=disable";
    }

    static String hostInUrl(String addr) {
        return addr.contains(":") ? "[" + addr + "]" : addr;
    }

    static String encode(String value) {
        return URLEncoder.encode(value, StandardCharsets.UTF_8).replace("+", "%20");
    }

    /**
     * Connection properties; {@code extra} adds or overrides, e.g.
     * preferQueryMode=simple or prepareThreshold=1.
     */
    static Properties properties(String password, String... extra) {
        Properties props = new Properties();
        props.setProperty("user", options.user);
        props.setProperty("password", password);
        props.setProperty("connectTimeout", String.valueOf(CONNECT_TIMEOUT_S));
        props.setProperty("loginTimeout", String.valueOf(CONNECT_TIMEOUT_S));
        props.setProperty("socketTimeout", String.valueOf(SOCKET_TIMEOUT_S));
        props.setProperty("cancelSignalTimeout", String.valueOf(CONNECT_TIMEOUT_S));
        props.setProperty("ApplicationName", "egressproxy-driver-check-jdbc");
        // Like libpq's gssencmode=disable in the Python tests: open with an
        // SSLRequest (or a plain startup), never a GSSENCRequest.
        props.setProperty("gssEncMode", "disable");
        for (int i = 0; i + 1 < extra.length; i += 2) {
            props.setProperty(extra[i], extra[i + 1]);
        }
        return props;
    }

    /**
     * With verify-full the URL names --host: make sure the JVM maps it to --addr
     * (through jdk.net.hosts.file) before connecting anywhere.
     */
    static void requireHostMapsToAddr() throws IOException {
        if (!options.verifyFull()) {
            return;
        }
        InetAddress want = InetAddress.getByName(options.addr);
        InetAddress[] found;
        try {
            found = InetAddress.getAllByName(options.host);
        } catch (IOException e) {
            found = new InetAddress[0];
        }
        if (!Arrays.asList(found).contains(want)) {
            throw new IOException(options.host + " resolves to " + Arrays.toString(found)
                    + ", not --addr " + options.addr + ": run the JVM with -Djdk.net.hosts.file=FILE"
                    + " (jdk.net.hosts.file=" + System.getProperty("jdk.net.hosts.file") + ")");
        }
    }

    /** Every connection a check opens goes through here, and is closed when the check ends. */
    static final class Scope {
        final List<Connection> connections = new ArrayList<>();

        Connection connect(String... extra) throws SQLException, IOException {
            return connectWith(options.password, extra);
        }

        Connection connectWith(String password, String... extra) throws SQLException, IOException {
            requireHostMapsToAddr();
            Connection conn = DriverManager.getConnection(url(), properties(password, extra));
            synchronized (connections) {
                connections.add(conn);
            }
            return conn;
        }

        /**
         * Close every connection; {@code abort} (after a timeout, when the check's
         * thread may still be using them) drops the sockets without waiting.
         */
        void close(boolean abort) {
            List<Connection> open;
            synchronized (connections) {
                open = new ArrayList<>(connections);
            }
            for (Connection conn : open) {
                try {
                    if (abort) {
                        conn.abort(Runnable::run);
                    } else {
                        conn.close();
                    }
                } catch (SQLException | RuntimeException e) {
                    log("close: " + e);
                }
            }
        }
    }

    static int queryInt(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getInt(1);
        }
    }

    // -------------------------------------------------------------------------
    // The checks

    static String checkConnect(Scope scope) throws Exception {
        Connection conn = scope.connect();
        expectEqual(queryInt(conn, "select 1"), 1, "select 1");
        boolean ssl = false;
        String version = null;
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery(
                        "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")) {
            if (rs.next()) {
                ssl = rs.getBoolean(1);
                version = rs.getString(2);
            }
        }
        String side = options.verifyFull()
                ? "driver TLS (sslmode=verify-full, host " + options.host + ")"
                : "plaintext to the proxy (sslmode=disable)";
        String detail = "pgjdbc " + conn.getMetaData().getDriverVersion() + ": select 1 ok; " + side + "; server pg_stat_ssl.ssl=" + ssl
                + (ssl ? " (" + version + ")" : "");
        if (!ssl) {
            throw new Exception(detail);
        }
        return detail;
    }

    static String checkSimpleQuery(Scope scope) throws Exception {
        Connection conn = scope.connect("preferQueryMode", "simple");
        expectEqual(queryInt(conn, "select 40 + 2"), 42, "select 40 + 2");
        return "simple protocol (preferQueryMode=simple): select 40 + 2 = 42";
    }

    static String checkExtendedQuery(Scope scope) throws Exception {
        Connection conn = scope.connect();
        try (PreparedStatement ps = conn.prepareStatement("select ?::int + ?::int")) {
            ps.setInt(1, 40);
            ps.setInt(2, 2);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                expectEqual(rs.getInt(1), 42, "select $1::int + $2::int");
            }
        }
        return "extended protocol: PreparedStatement select ?::int + ?::int with (40, 2) = 42";
    }

    static String checkPrepared(Scope scope) throws Exception {
        Connection conn = scope.connect("prepareThreshold", "1");
        String sql = "select ?::int * ?::int as egress_product";
        int[][] cases = {{6, 7}, {3, 14}, {-5, 9}, {1000, 1000}};
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            for (int[] c : cases) {
                ps.setInt(1, c[0]);
                ps.setInt(2, c[1]);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    expectEqual(rs.getInt(1), c[0] * c[1], "product(" + c[0] + ", " + c[1] + ")");
                }
            }
            boolean serverSide = ps.unwrap(PGStatement.class).isUseServerPrepare();
            String name = serverPreparedName(conn);
            if (!serverSide || name == null) {
                throw new Exception("statement was not prepared server-side (isUseServerPrepare="
                        + serverSide + ", pg_prepared_statements: " + name + ")");
            }
            return "PreparedStatement (prepareThreshold=1) executed " + cases.length
                    + " times, results right; server-side statement " + name
                    + " in pg_prepared_statements";
        }
    }

    /** The name pgjdbc gave our statement on the server (e.g. S_1), or null. */
    static String serverPreparedName(Connection conn) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(
                "select name from pg_prepared_statements where statement like '%egress_product%'"
                        + " and not from_sql and statement not like '%pg_prepared_statements%'")) {
            try (ResultSet rs = ps.executeQuery()) {
                return rs.next() ? rs.getString(1) : null;
            }
        }
    }

    static String checkCopy(Scope scope) throws Exception {
        Connection conn = scope.connect();
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table egress_copy_check (id int, payload text)");
        }
        byte[] sent = copyRows(COPY_ROWS);
        CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
        long copied = copy.copyIn("copy egress_copy_check (id, payload) from stdin",
                new ByteArrayInputStream(sent), 64 * 1024);

        DigestingStream received = new DigestingStream();
        copy.copyOut("copy (select id, payload from egress_copy_check order by id) to stdout", received);

        String sentHash = hex(sha256().digest(sent));
        String receivedHash = hex(received.digest.digest());
        String detail = copied + " rows in, " + sent.length + " bytes sent sha256 "
                + sentHash.substring(0, 16) + ", " + received.count + " bytes received sha256 "
                + receivedHash.substring(0, 16);
        if (copied != COPY_ROWS || !sentHash.equals(receivedHash)) {
            throw new Exception("mismatch: " + detail);
        }
        return "match: " + detail;
    }

    static String checkListenNotify(Scope scope) throws Exception {
        Connection listener = scope.connect();
        Connection notifier = scope.connect();
        String channel = "egress_chan_" + randomHex(6);
        String payload = "payload-" + randomHex(6);
        try (Statement st = listener.createStatement()) {
            st.execute("listen " + channel);
        }
        long started = System.nanoTime();
        try (Statement st = notifier.createStatement()) {
            st.execute("notify " + channel + ", '" + payload + "'");
        }
        int notifierPid = notifier.unwrap(PGConnection.class).getBackendPID();
        PGConnection pgListener = listener.unwrap(PGConnection.class);
        long deadline = started + TimeUnit.MILLISECONDS.toNanos(NOTIFY_WAIT_MS);
        while (true) {
            long leftMs = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime());
            if (leftMs <= 0) {
                throw new Exception("no notification on " + channel + " within "
                        + NOTIFY_WAIT_MS / 1000.0 + " s");
            }
            PGNotification[] got = pgListener.getNotifications((int) leftMs);
            for (PGNotification n : got == null ? new PGNotification[0] : got) {
                if (n.getName().equals(channel) && n.getParameter().equals(payload)) {
                    if (n.getPID() != notifierPid) {
                        throw new Exception("notification came from pid " + n.getPID()
                                + ", not the notifier's " + notifierPid);
                    }
                    return "received " + payload + " on " + channel + " from pid " + n.getPID()
                            + " after " + seconds(System.nanoTime() - started) + " s";
                }
            }
        }
    }

    /**
     * Statement.cancel() from another thread: pgjdbc sends a CancelRequest on a new
     * socket. If the query is still running CANCEL_WAIT_MS later, the connection
     * is aborted so that the check ends then, not at the socket timeout.
     */
    static String checkCancel(Scope scope) throws Exception {
        Connection conn = scope.connect();
        int pid = conn.unwrap(PGConnection.class).getBackendPID();
        ScheduledExecutorService timer = Executors.newSingleThreadScheduledExecutor(daemonThreads());
        long[] cancelledAt = {0};
        boolean[] gaveUp = {false};
        try (Statement st = conn.createStatement()) {
            ScheduledFuture<?> canceller = timer.schedule(() -> {
                cancelledAt[0] = System.nanoTime();
                st.cancel();
                return null;
            }, CANCEL_AFTER_MS, TimeUnit.MILLISECONDS);
            ScheduledFuture<?> giveUp = timer.schedule(() -> {
                gaveUp[0] = true;
                conn.abort(Runnable::run);
                return null;
            }, CANCEL_AFTER_MS + CANCEL_WAIT_MS, TimeUnit.MILLISECONDS);
            SQLException failure = null;
            try {
                st.executeQuery("select pg_sleep(30)").close();
            } catch (SQLException e) {
                failure = e;
            }
            long failedAt = System.nanoTime();
            giveUp.cancel(false);
            canceller.get(CANCEL_WAIT_MS, TimeUnit.MILLISECONDS);
            if (gaveUp[0]) {
                throw new Exception("pg_sleep(30) was still running " + CANCEL_WAIT_MS / 1000.0
                        + " s after Statement.cancel() (CancelRequest for pid " + pid
                        + "); connection aborted");
            }
            if (failure == null) {
                throw new Exception("pg_sleep(30) finished without being canceled");
            }
            if (!"57014".equals(failure.getSQLState())) {
                throw new Exception("query failed with " + failure.getSQLState() + ": " + failure.getMessage());
            }
            double waited = seconds(failedAt - cancelledAt[0]);
            expectEqual(queryInt(conn, "select 1"), 1, "select 1 after the cancel");
            return "Statement.cancel() from another thread after " + CANCEL_AFTER_MS / 1000.0
                    + " s (CancelRequest for pid " + pid + "); query failed with 57014 \""
                    + failure.getMessage() + "\" " + waited + " s later; connection still usable";
        } finally {
            timer.shutdownNow();
        }
    }

    static String checkWrongPassword(Scope scope) throws Exception {
        try {
            scope.connectWith(options.password + "-wrong");
        } catch (SQLException e) {
            String message = String.valueOf(e.getMessage());
            if (!"28P01".equals(e.getSQLState()) || !message.contains("password authentication failed")) {
                throw new Exception("expected 28P01, got " + e.getSQLState() + ": " + message);
            }
            return message;
        }
        throw new Exception("connected with a wrong password");
    }

    // -------------------------------------------------------------------------
    // COPY data: deterministic rows in COPY's text format, with non-ASCII text,
    // tabs, newlines and backslashes escaped as the server itself writes them,
    // so COPY TO gives back exactly the same bytes (the same rows as the node
    // script's, so both report the same SHA-256).

    static byte[] copyRows(int count) {
        StringBuilder out = new StringBuilder(count * 56);
        for (int id = 1; id <= count; id++) {
            String payload = "row " + id + "\tcafé ß 日本語 \uD83D\uDC18\\ \n" + "x".repeat(id % 17);
            out.append(id).append('\t').append(escapeCopyText(payload)).append('\n');
        }
        return out.toString().getBytes(StandardCharsets.UTF_8);
    }

    static String escapeCopyText(String text) {
        return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r");
    }

    /** An OutputStream that only counts and hashes what COPY TO writes. */
    static final class DigestingStream extends OutputStream {
        final MessageDigest digest = sha256();
        long count;

        @Override
        public void write(int b) {
            digest.update((byte) b);
            count++;
        }

        @Override
        public void write(byte[] b, int off, int len) {
            digest.update(b, off, len);
            count += len;
        }
    }

    // -------------------------------------------------------------------------
    // Small helpers

    static void log(String text) {
        System.err.println("PgCheck: " + text);
    }

    static MessageDigest sha256() {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    static String hex(byte[] bytes) {
        return HexFormat.of().formatHex(bytes);
    }

    static final SecureRandom RANDOM = new SecureRandom();

    static String randomHex(int bytes) {
        byte[] b = new byte[bytes];
        RANDOM.nextBytes(b);
        return hex(b);
    }

    static double seconds(long nanos) {
        return Math.round(nanos / 1e6) / 1000.0;
    }

    static void expectEqual(long actual, long expected, String what) throws Exception {
        if (actual != expected) {
            throw new Exception(what + ": expected " + expected + ", got " + actual);
        }
    }

    static java.util.concurrent.ThreadFactory daemonThreads() {
        return runnable -> {
            Thread t = new Thread(runnable);
            t.setDaemon(true);
            return t;
        };
    }

    static String errorText(Throwable e) {
        if (e instanceof SQLException && ((SQLException) e).getSQLState() != null) {
            return ((SQLException) e).getSQLState() + ": " + e.getMessage();
        }
        String message = e.getMessage();
        return message != null ? message : e.toString();
    }

    // -------------------------------------------------------------------------
    // Running

    /** Run one check with its time limit, print its JSON line, return whether it was ok. */
    static boolean runCheck(String name, long deadline) {
        long started = System.nanoTime();
        long limit = Math.min(TimeUnit.SECONDS.toNanos(CHECK_TIMEOUT_S), deadline - started);
        if (limit <= 0) {
            printResult(name, false, "not run: the script's " + RUN_BUDGET_S + " s budget is used up", 0);
            return false;
        }
        Scope scope = new Scope();
        ExecutorService runner = Executors.newSingleThreadExecutor(daemonThreads());
        boolean ok = true;
        boolean timedOut = false;
        String detail;
        Future<String> result = runner.submit(() -> CHECKS.get(name).run(scope));
        try {
            detail = result.get(limit, TimeUnit.NANOSECONDS);
        } catch (TimeoutException e) {
            ok = false;
            timedOut = true;
            detail = "timed out after " + seconds(limit) + " s in check " + name;
            result.cancel(true);
            log(detail);
        } catch (ExecutionException e) {
            ok = false;
            detail = errorText(e.getCause());
            log(name + " failed: " + e.getCause());
            e.getCause().printStackTrace(System.err);
        } catch (InterruptedException e) {
            ok = false;
            detail = "interrupted";
            Thread.currentThread().interrupt();
        }
        scope.close(timedOut);
        runner.shutdownNow();
        printResult(name, ok, detail, seconds(System.nanoTime() - started));
        return ok;
    }

    static void printResult(String name, boolean ok, String detail, double took) {
        RESULTS.println("{\"check\": " + json(name) + ", \"ok\": " + ok + ", \"detail\": "
                + json(detail) + ", \"seconds\": " + took + "}");
    }

    static String json(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }
}
