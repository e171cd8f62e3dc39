# Writes the RDS reader's fixtures with real R: Rscript rds_fixtures.R OUT_DIR GENES_FILE
suppressPackageStartupMessages({library(Matrix); library(SingleCellExperiment); library(SeuratObject)})
args <- commandArgs(trailingOnly = TRUE)
out <- args[1]
genes <- readLines(args[2])
set.seed(42)
n_cells <- 40
counts <- matrix(rpois(length(genes) * n_cells, 3), nrow = length(genes),
                 dimnames = list(genes, sprintf("cell%02d", seq_len(n_cells))))
counts[sample(length(counts), length(counts) %/% 3)] <- 0L   # sparse, as counts are
storage.mode(counts) <- "integer"
write.csv(counts, file.path(out, "truth.csv"))                # the answer, as plain text
dg <- as(counts, "dgCMatrix")
saveRDS(dg, file.path(out, "counts_dgCMatrix.rds"))
saveRDS(counts, file.path(out, "counts_dense.rds"))
cell_type <- factor(rep(c("T", "B", "NK", "Mono"), length.out = n_cells))
sce <- SingleCellExperiment(
  assays = list(counts = dg, logcounts = log1p(dg)),
  colData = DataFrame(cell_type = cell_type, donor = rep(c("d1", "d2"), each = n_cells / 2),
                      row.names = colnames(counts)),
  rowData = DataFrame(gene_id = sprintf("ENSG%011d", seq_along(genes))))
saveRDS(sce, file.path(out, "sce.rds"))
seu <- CreateSeuratObject(counts = dg, project = "fixture", min.cells = 0, min.features = 0)
seu$cell_type <- as.character(cell_type)
saveRDS(seu, file.path(out, "seurat_v4.rds"))
saveRDS(data.frame(a = 1:3, b = c("x", "y", "z")), file.path(out, "a_data_frame.rds"))
saveRDS(lm(b ~ a, data = data.frame(a = 1:5, b = c(2, 4, 5, 4, 5))), file.path(out, "a_model.rds"))
cat(as.character(packageVersion("SeuratObject")), as.character(packageVersion("SingleCellExperiment")),
    R.version.string, "\n", file = file.path(out, "versions.txt"))
