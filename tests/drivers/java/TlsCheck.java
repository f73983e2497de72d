// pgjdbc through shardgate over TLS: java -cp postgresql.jar TlsCheck.java <jdbc url> <user> <password>
// Prints the number of merchant 3's orders, read with a prepared statement.
import java.sql.*;

public class TlsCheck {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2]);
             PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM t_order WHERE merchant_id = ?")) {
            ps.setLong(1, 3);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                System.out.println("count=" + rs.getLong(1));
            }
        }
    }
}
